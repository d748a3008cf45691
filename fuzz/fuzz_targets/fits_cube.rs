//! A FITS file as a worker receives a dataset: its headers probed for the format (MaNGA, MUSE,
//! MEGARA), the layout and WCS read from header keywords, then the first rows and planes
//! read. Nothing may panic or crash; every failure is a typed error.
#![no_main]

use std::io::Write;

use astro_fit::cube::Cube;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // cfitsio reads files by name: one file per process, rewritten for each input, in memory
    // when /dev/shm exists.
    thread_local! {
        static PATH: std::path::PathBuf = {
            let dir = ["/dev/shm", "/tmp"]
                .into_iter()
                .map(std::path::PathBuf::from)
                .find(|d| d.is_dir())
                .unwrap_or_else(std::env::temp_dir);
            dir.join(format!("ceccm-fuzz-{}.fits", std::process::id()))
        };
    }
    PATH.with(|path| {
        let mut file = std::fs::File::create(path).expect("fuzz input file");
        file.write_all(data).expect("write fuzz input");
        drop(file);
        let Ok(mut cube) = Cube::open(path) else {
            return;
        };
        let meta = cube.meta().clone();
        if meta.ny > 0 {
            let _ = cube.read_rows(0..1);
        }
        if meta.nwave() > 0 {
            let _ = cube.read_planes(0..1);
        }
    });
});
