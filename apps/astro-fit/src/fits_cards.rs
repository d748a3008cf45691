//! Whole FITS header cards, read and written as cfitsio stores them (80 characters each), so
//! that a header travels with every keyword, comment, `HISTORY`/`COMMENT` line and long-string
//! `CONTINUE` card it had, not only the keywords a program knows about.
//!
//! The fitsio crate reads and writes single typed keywords only; cfitsio's record calls
//! (`ffghsp`, `ffgrec`, `ffprec`) are reached through its raw handle, hence `unsafe` here.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::os::raw::c_char;

use fitsio::FitsFile;
use fitsio::errors::check_status;
use fitsio::sys;

/// cfitsio's card buffer: 80 characters and the terminating NUL (FLEN_CARD).
const CARD_BUFFER: usize = 81;

/// Every card of the current HDU of `file`, in order (without `END`).
pub fn read_cards(file: &mut FitsFile) -> fitsio::errors::Result<Vec<String>> {
    let mut status = 0;
    let mut count = 0;
    let mut more = 0;
    // SAFETY: `as_raw` is the open handle of `file`, borrowed mutably for this call; cfitsio
    // writes two ints and the status.
    unsafe {
        sys::ffghsp(file.as_raw(), &mut count, &mut more, &mut status);
    }
    check_status(status)?;
    let mut cards = Vec::with_capacity(count.max(0) as usize);
    let mut buffer = [0 as c_char; CARD_BUFFER];
    for n in 1..=count {
        // SAFETY: `buffer` holds FLEN_CARD characters, the most cfitsio writes for one card,
        // NUL-terminated; `n` is within the header's card count.
        unsafe {
            sys::ffgrec(file.as_raw(), n, buffer.as_mut_ptr(), &mut status);
        }
        check_status(status)?;
        // SAFETY: cfitsio NUL-terminated the card within the buffer.
        let card = unsafe { CStr::from_ptr(buffer.as_ptr()) };
        cards.push(card.to_string_lossy().into_owned());
    }
    Ok(cards)
}

/// Makes the header of the current HDU of `file` its layout cards followed by `cards`: the
/// cards a writer added on its own (cfitsio's two `COMMENT` lines about the FITS standard) go,
/// so the header is the one carried, not a mix.
pub fn replace_cards(file: &mut FitsFile, cards: &[String]) -> fitsio::errors::Result<()> {
    let present = read_cards(file)?;
    for (n, card) in present.iter().enumerate().rev() {
        if describes_layout(card) {
            continue;
        }
        let mut status = 0;
        // SAFETY: the open handle of `file`; `n + 1` is an existing card number, deleted from
        // the last so the numbers of the ones left to delete do not move.
        unsafe {
            sys::ffdrec(file.as_raw(), n as i32 + 1, &mut status);
        }
        check_status(status)?;
    }
    write_cards(file, cards)
}

/// Appends `cards` to the header of the current HDU of `file`, each as given.
pub fn write_cards(file: &mut FitsFile, cards: &[String]) -> fitsio::errors::Result<()> {
    for card in cards {
        // A card is printable ASCII; anything else (a NUL above all) is not a card.
        let Ok(text) = CString::new(card.as_str()) else {
            continue;
        };
        let mut status = 0;
        // SAFETY: `text` is NUL-terminated and outlives the call; cfitsio copies at most 80
        // characters of it into the header.
        unsafe {
            sys::ffprec(file.as_raw(), text.as_ptr(), &mut status);
        }
        check_status(status)?;
    }
    Ok(())
}

/// The card's keyword (the first eight characters, trimmed), or `HIERARCH ...` as written.
pub fn keyword(card: &str) -> &str {
    card.get(..8).unwrap_or(card).trim_end()
}

/// Whether a card describes how the data unit is laid out (or checksums it), which a writer of
/// new data writes itself: copying it would contradict the data written.
pub fn describes_layout(card: &str) -> bool {
    let key = keyword(card);
    let numbered = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(
        key,
        "SIMPLE"
            | "BITPIX"
            | "NAXIS"
            | "EXTEND"
            | "XTENSION"
            | "PCOUNT"
            | "GCOUNT"
            | "EXTNAME"
            | "BSCALE"
            | "BZERO"
            | "CHECKSUM"
            | "DATASUM"
            | "TFIELDS"
            // The tiled-image convention's own keywords, when the source was tile-compressed.
            | "ZIMAGE"
            | "ZSIMPLE"
            | "ZTENSION"
            | "ZEXTEND"
            | "ZBITPIX"
            | "ZNAXIS"
            | "ZPCOUNT"
            | "ZGCOUNT"
            | "ZCMPTYPE"
            | "ZQUANTIZ"
            | "ZDITHER0"
            | "ZHECKSUM"
            | "ZDATASUM"
            | "ZBLANK"
            | "ZSCALE"
            | "ZZERO"
    ) || [
        "NAXIS", "TTYPE", "TFORM", "ZNAXIS", "ZTILE", "ZNAME", "ZVAL",
    ]
    .iter()
    .any(|p| numbered(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_cards_are_told_from_the_ones_that_describe_the_observation() {
        for layout in [
            "SIMPLE  =                    T",
            "NAXIS3  =                 3681",
            "BITPIX  =                  -32",
            "EXTNAME = 'DATA    '",
            "ZNAXIS1 =                   40",
            "TFORM1  = '1PB(2880)'",
            "CHECKSUM= 'abc'",
        ] {
            assert!(describes_layout(layout), "{layout}");
        }
        for kept in [
            "DATE-OBS= '2014-06-05T03:07:27.392'",
            "RA      =           338.276140",
            "HISTORY   this was done",
            "COMMENT FITS (Flexible Image Transport System)",
            "HIERARCH ESO DET CHIP NAME = 'MUSE'",
            "NAXISX  = 'not a layout card'",
            "CONTINUE  '&'",
        ] {
            assert!(!describes_layout(kept), "{kept}");
        }
    }

    #[test]
    fn carried_cards_replace_what_the_writer_put_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cards.fits");
        let cards: Vec<String> = [
            "DATE-OBS= '2014-06-05T03:07:27.392' / observation start",
            "EXPTIME =                 900. / [s] exposure",
            "HISTORY reduced by the MUSE pipeline",
            "HIERARCH ESO OBS NAME = 'NGC4650A'",
        ]
        .map(String::from)
        .to_vec();
        {
            let mut file = FitsFile::create(&path).open().unwrap();
            file.primary_hdu().unwrap();
            // cfitsio wrote its own two COMMENT cards about the standard: they go.
            assert_eq!(read_cards(&mut file).unwrap().len(), 6);
            replace_cards(&mut file, &cards).unwrap();
        }
        let mut file = FitsFile::open(&path).unwrap();
        file.primary_hdu().unwrap();
        let back = read_cards(&mut file).unwrap();
        let kept: Vec<&str> = back
            .iter()
            .filter(|c| !describes_layout(c))
            .map(|c| c.trim_end())
            .collect();
        assert_eq!(kept, cards.iter().map(|c| c.as_str()).collect::<Vec<_>>());
    }
}
