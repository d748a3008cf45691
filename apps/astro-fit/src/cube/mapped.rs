//! A plain (uncompressed) FITS file opened by cfitsio from a read-only memory map.
//!
//! A chunk of spectra touches every wavelength plane of a cube: through cfitsio's file driver
//! that is one `lseek` + `read` of a 2880-byte record per row per plane per HDU (about 29,000
//! system calls for 64 MaNGA spectra; 3.5 million for a 5,041-spectrum cube, measured with
//! `strace -c`). From a memory map the same reads are copies out of the page cache.
//!
//! This is the one place that needs `unsafe`: cfitsio's `ffomem` takes raw pointers.

#![allow(unsafe_code)]

use std::ffi::{CString, c_void};
use std::path::Path;

use fitsio::FitsFile;
use fitsio::sys;

/// Keeps the memory cfitsio reads alive. Must outlive (be dropped after) the `FitsFile`.
pub(crate) struct Mapped {
    _map: memmap2::Mmap,
    // cfitsio keeps these two addresses and reads through them on every access, so they
    // live in boxes that do not move.
    _address: Box<*mut c_void>,
    _size: Box<usize>,
}

/// Size of a FITS record: every FITS file is a whole number of them.
const RECORD: usize = 2880;

/// Opens `path` read-only through a memory map. `None` when it cannot be mapped (an empty
/// file, a special file, a size that is not whole FITS records): the caller keeps reading it
/// through cfitsio's file driver. Call it only for a file cfitsio opened and checked complete:
/// cfitsio reads whole records, and every one must lie inside the map.
pub(crate) fn open(path: &Path) -> Option<(FitsFile, Mapped)> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: the map is read-only and the files mapped are not modified while open (region
    // caches are content-addressed and immutable). A file truncated by another process while
    // mapped would fault on access, as with any mapped reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    if map.is_empty() || map.len() % RECORD != 0 {
        return None;
    }
    let name = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut address = Box::new(map.as_ptr() as *mut c_void);
    let mut size = Box::new(map.len());
    let mut fptr: *mut sys::fitsfile = std::ptr::null_mut();
    let mut status = 0;
    // SAFETY: READONLY (0) means cfitsio never writes to nor reallocates the buffer (no
    // realloc function is given); `address` and `size` are boxed and kept in `Mapped`, which
    // the caller drops after the `FitsFile` that uses them.
    unsafe {
        sys::ffomem(
            &mut fptr,
            name.as_ptr(),
            0,
            &mut *address,
            &mut *size,
            0,
            None,
            &mut status,
        );
    }
    if status != 0 || fptr.is_null() {
        return None;
    }
    // SAFETY: `fptr` is an open cfitsio handle that `FitsFile` now owns and closes.
    let fits = unsafe { FitsFile::from_raw(fptr, fitsio::FileOpenMode::READONLY) }.ok()?;
    Some((
        fits,
        Mapped {
            _map: map,
            _address: address,
            _size: size,
        },
    ))
}
