//! Standard tile-compressed FITS output.
