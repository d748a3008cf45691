//! Spaxel and pixel filtering.
