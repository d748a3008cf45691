//! `astro-fit edge` end to end on the MUSE cut-out in the shared data.

use std::path::Path;

use astro_fit::edge::io::{read_fits_cube, write_fits_cube};
use astro_fit::edge::tilefits::{TileOptions, write_tile_compressed};
use astro_fit::edge::{Role, Samples, SpectralCube, sigma_from_noise};
use fitsio::FitsFile;

use crate::{astro_fit, cube_file, have};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32_plane(cube: &SpectralCube, role: Role) -> &[f32] {
    match &cube.plane(role).unwrap().samples {
        Samples::F32(v) => v,
        other => panic!("{:?}", other.dtype()),
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn lossless_cli_round_trip_is_bit_exact_and_readable_by_the_cube_module() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let packed = dir.path().join("c.tarsis");
    let back = dir.path().join("back.fits");
    let o = astro_fit(&[
        "edge",
        "compress",
        "--lossless",
        s(&input),
        "--out",
        s(&packed),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = astro_fit(&["edge", "decompress", s(&packed), "--out", s(&back)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let original = read_fits_cube(&input).unwrap();
    let restored = read_fits_cube(&back).unwrap();
    assert_eq!(original.planes.len(), 2);
    for (a, b) in original.planes.iter().zip(&restored.planes) {
        assert_eq!(a.name, b.name);
        assert_eq!(
            a.samples.le_bytes(0..a.samples.len()),
            b.samples.le_bytes(0..b.samples.len())
        );
    }
    assert_eq!(original.aux, restored.aux);
    // Every HDU written back has its header back (the 2-D FIELDMAP image is not carried; the
    // wavelength HDU, which the file did not have, is the writer's).
    for name in ["PRIMARY", "DATA", "STAT"] {
        let find = |c: &SpectralCube| c.headers.iter().find(|h| h.hdu == name).cloned();
        assert_eq!(find(&original), find(&restored), "{name}");
        assert!(find(&original).unwrap().cards.len() > 20, "{name}");
    }
}

/// Every card of every HDU of `path`, in order, but the data layout's (which describe the data
/// as stored, not the observation).
fn headers_of(path: &Path) -> Vec<(String, Vec<String>)> {
    use astro_fit::fits_cards::{describes_layout, read_cards};
    let mut file = FitsFile::open(path).unwrap();
    let mut out = Vec::new();
    for index in 0..file.num_hdus().unwrap() {
        let hdu = file.hdu(index).unwrap();
        let name = hdu
            .read_key::<String>(&mut file, "EXTNAME")
            .unwrap_or_else(|_| "PRIMARY".into());
        let cards = read_cards(&mut file)
            .unwrap()
            .into_iter()
            .filter(|c| !describes_layout(c))
            .collect();
        out.push((name, cards));
    }
    out
}

/// The edge's default (lossy) round trip of the real MUSE minicube keeps every header card of
/// every HDU: the 1,309 of its primary header (DATE-OBS, RA, DEC, EXPTIME, the ESO hierarchy,
/// comments) and each extension's, in order; only pixels are approximated.
#[test]
fn a_lossy_round_trip_keeps_every_header_card_of_every_hdu() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("minicube.fits");
    let packed = dir.path().join("c.tarsis");
    let back = dir.path().join("back.fits");
    let o = astro_fit(&["edge", "compress", s(&input), "--out", s(&packed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = astro_fit(&["edge", "decompress", s(&packed), "--out", s(&back)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let original = headers_of(&input);
    let restored = headers_of(&back);
    let primary = &original[0].1;
    assert!(primary.len() > 1200, "{} primary cards", primary.len());
    for key in ["DATE-OBS", "RA      ", "DEC     ", "EXPTIME "] {
        assert!(primary.iter().any(|c| c.starts_with(key)), "{key}");
    }
    for (name, cards) in &original {
        let (_, back_cards) = restored
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("HDU {name} lost"));
        assert_eq!(back_cards, cards, "HDU {name}");
    }
}

#[test]
fn lossy_cli_keeps_the_bound_inspects_and_serves_one_spaxel() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let packed = dir.path().join("c.tarsis");
    let back = dir.path().join("back.fits");
    let o = astro_fit(&[
        "edge",
        "compress",
        "--max-error-sigma",
        "0.25",
        s(&input),
        "--out",
        s(&packed),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        astro_fit(&["edge", "decompress", s(&packed), "--out", s(&back)])
            .status
            .success()
    );
    let original = read_fits_cube(&input).unwrap();
    let restored = read_fits_cube(&back).unwrap();
    let (f0, n0) = (
        f32_plane(&original, Role::Flux),
        f32_plane(&original, Role::Variance),
    );
    let f1 = f32_plane(&restored, Role::Flux);
    let mut worst = 0f64;
    for i in 0..f0.len() {
        match sigma_from_noise(Role::Variance, n0[i]) {
            Some(sigma) if f0[i].is_finite() => {
                worst = worst.max((f64::from(f1[i]) - f64::from(f0[i])).abs() / sigma)
            }
            _ => assert_eq!(f1[i].to_bits(), f0[i].to_bits()),
        }
    }
    assert!(worst <= 0.25 && worst > 0.2, "worst error {worst} sigma");

    let o = astro_fit(&["edge", "inspect", s(&packed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["blocks"], report["blocks_verified"]);
    assert!(report["ratio"].as_f64().unwrap() > 3.0);
    assert_eq!(
        report["header"]["planes"][0]["encoding"]["kind"],
        "quantized-flux"
    );

    let o = astro_fit(&["edge", "decompress", s(&packed), "--spaxel", "7,3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let spaxel: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let data = spaxel["planes"]["DATA"].as_array().unwrap();
    let s0 = (3 * original.nx + 7) * original.nwave;
    assert_eq!(data.len(), original.nwave);
    for (k, v) in data.iter().enumerate() {
        match v.as_f64() {
            Some(v) => assert_eq!(v as f32, f1[s0 + k]),
            None => assert!(f1[s0 + k].is_nan()),
        }
    }
}

#[test]
fn corrupted_and_truncated_containers_fail_naming_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let packed = dir.path().join("c.tarsis");
    assert!(
        astro_fit(&["edge", "compress", s(&input), "--out", s(&packed)])
            .status
            .success()
    );
    let bytes = std::fs::read(&packed).unwrap();
    let mut bad = bytes.clone();
    let middle = bytes.len() / 2;
    bad[middle] ^= 0xff;
    let corrupt = dir.path().join("bad.tarsis");
    std::fs::write(&corrupt, &bad).unwrap();
    let o = astro_fit(&["edge", "inspect", s(&corrupt)]);
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(msg.contains("block ") && msg.contains("spaxels"), "{msg}");
    assert!(
        msg.contains("checksum mismatch") || msg.contains("corrupt"),
        "{msg}"
    );

    let cut = dir.path().join("cut.tarsis");
    std::fs::write(&cut, &bytes[..middle]).unwrap();
    let o = astro_fit(&[
        "edge",
        "decompress",
        "-",
        "--out",
        s(&dir.path().join("x.fits")),
    ]);
    assert!(!o.status.success(), "empty stdin is not a container");
    let o = astro_fit(&[
        "edge",
        "decompress",
        s(&cut),
        "--out",
        s(&dir.path().join("y.fits")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
}

#[test]
fn lossy_mode_refuses_a_cube_without_noise() {
    let dir = tempfile::tempdir().unwrap();
    let mut cube = read_fits_cube(&cube_file("subcub_mosaic.fits")).unwrap();
    cube.planes.retain(|p| p.role == Role::Flux);
    let no_noise = dir.path().join("no_noise.fits");
    write_fits_cube(&cube, &no_noise).unwrap();
    let out = dir.path().join("x.tarsis");
    let o = astro_fit(&["edge", "compress", s(&no_noise), "--out", s(&out)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs per-pixel noise"),
        "{}",
        stderr(&o)
    );
    let o = astro_fit(&[
        "edge",
        "compress",
        "--lossless",
        s(&no_noise),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn tile_compressed_fits_has_one_spectrum_tiles_and_standard_readers_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cube = read_fits_cube(&cube_file("subcub_mosaic.fits")).unwrap();
    let tiled = dir.path().join("tiled.fits");
    write_tile_compressed(&cube, &tiled, &TileOptions::default()).unwrap();
    let mut f = FitsFile::open(&tiled).unwrap();
    // cfitsio hides the compression table; read its keywords through the raw HDU name.
    let hdu = f.hdu("DATA").unwrap();
    let ztile: Vec<i64> = (1..=3)
        .map(|i| hdu.read_key(&mut f, &format!("ZTILE{i}")).unwrap())
        .collect();
    assert_eq!(ztile, vec![1, 1, cube.nwave as i64]);
    let cmp: String = hdu.read_key(&mut f, "ZCMPTYPE").unwrap();
    assert_eq!(cmp.trim(), "RICE_1");
    let quant: String = hdu.read_key(&mut f, "ZQUANTIZ").unwrap();
    assert!(quant.contains("DITHER"), "{quant}");
    let stat: String = f.hdu("STAT").unwrap().read_key(&mut f, "ZCMPTYPE").unwrap();
    assert_eq!(stat.trim(), "RICE_1");

    let back = read_fits_cube(&tiled).unwrap();
    let (f0, f1) = (f32_plane(&cube, Role::Flux), f32_plane(&back, Role::Flux));
    let n0 = f32_plane(&cube, Role::Variance);
    let n1 = f32_plane(&back, Role::Variance);
    let worst_noise = (0..n0.len())
        .map(|i| (f64::from(n1[i]) / f64::from(n0[i]) - 1.0).abs())
        .fold(0f64, f64::max);
    assert!(
        worst_noise > 0.0 && worst_noise < 0.01,
        "variance rel error {worst_noise}"
    );
    let errs: Vec<f64> = (0..f0.len())
        .filter_map(|i| {
            let sigma = sigma_from_noise(Role::Variance, n0[i])?;
            f0[i]
                .is_finite()
                .then(|| (f64::from(f1[i]) - f64::from(f0[i])) / sigma)
        })
        .collect();
    let rms = (errs.iter().map(|e| e * e).sum::<f64>() / errs.len() as f64).sqrt();
    assert!(rms > 0.03 && rms < 0.12, "q=4 flux error RMS {rms} sigma");

    if have("funpack", &["-V"]) {
        let unpacked = dir.path().join("unpacked.fits");
        let o = std::process::Command::new("funpack")
            .args(["-O", s(&unpacked), s(&tiled)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let via_funpack = read_fits_cube(&unpacked).unwrap();
        assert_eq!(
            f32_plane(&via_funpack, Role::Flux),
            f1,
            "funpack and cfitsio agree"
        );
    } else {
        eprintln!("funpack not installed (apt-get install libcfitsio-bin): that check skipped");
    }
    if have("python3", &["-c", "import astropy"]) {
        let script = format!(
            "from astropy.io import fits; h = fits.open('{}'); \
             print(type(h['DATA']).__name__, h['DATA'].data.shape, float(h['DATA'].data[100, 7, 5]))",
            s(&tiled)
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        let expected = f1[(7 * cube.nx + 5) * cube.nwave + 100];
        assert!(
            text.starts_with(&format!(
                "CompImageHDU ({}, {}, {})",
                cube.nwave, cube.ny, cube.nx
            )),
            "{text}"
        );
        let value: f32 = text
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<f64>()
            .unwrap() as f32;
        assert_eq!(value, expected);
    } else {
        eprintln!("astropy not installed (pip install astropy): that check skipped");
    }
}

#[test]
fn filter_cli_writes_a_cube_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let out = dir.path().join("filtered.fits");
    let report = dir.path().join("report.json");
    let o = astro_fit(&[
        "edge",
        "filter",
        s(&input),
        "--out",
        s(&out),
        "--report",
        s(&report),
        "--min-snr",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["spaxels_total"], 900);
    let dropped = r["spaxels"].as_array().unwrap();
    assert!(
        !dropped.is_empty() && dropped.len() < 900,
        "{}",
        dropped.len()
    );
    let filtered = read_fits_cube(&out).unwrap();
    let flags = filtered
        .planes
        .iter()
        .find(|p| p.name == "EDGEFLAG")
        .unwrap();
    let Samples::U8(flags) = &flags.samples else {
        panic!()
    };
    let flagged_spaxels = (0..900)
        .filter(|s| flags[s * filtered.nwave] & 12 != 0)
        .count();
    assert_eq!(flagged_spaxels, dropped.len());
    let o = astro_fit(&[
        "edge",
        "filter",
        s(&input),
        "--out",
        s(&out),
        "--report",
        s(&report),
        "--min-snr",
        "nan",
    ]);
    assert!(!o.status.success());
}

#[test]
fn decompress_streams_from_stdin() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let packed = dir.path().join("c.tarsis");
    let from_file = dir.path().join("file.fits");
    let from_pipe = dir.path().join("pipe.fits");
    assert!(
        astro_fit(&["edge", "compress", s(&input), "--out", s(&packed)])
            .status
            .success()
    );
    assert!(
        astro_fit(&["edge", "decompress", s(&packed), "--out", s(&from_file)])
            .status
            .success()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_astro-fit"))
        .args(["edge", "decompress", "-", "--out", s(&from_pipe)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(&packed).unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (
        read_fits_cube(&from_file).unwrap(),
        read_fits_cube(&from_pipe).unwrap(),
    );
    let bits = |c: &SpectralCube| -> Vec<Vec<u8>> {
        c.planes
            .iter()
            .map(|p| p.samples.le_bytes(0..p.samples.len()))
            .collect()
    };
    assert_eq!(bits(&a), bits(&b));
}

/// Files are named with `--out` (as everywhere in astro-fit; `-o` is a format elsewhere); the
/// old `-o FILE` / `--output FILE` still work, hidden, and `-o json` is refused as the mistake
/// it is. Decompress says what it wrote.
#[test]
fn edge_files_are_named_with_out_and_decompress_says_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let input = cube_file("subcub_mosaic.fits");
    let packed = dir.path().join("c.tarsis");
    let back = dir.path().join("back.fits");
    let o = astro_fit(&["edge", "compress", s(&input), "-o", s(&packed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = astro_fit(&["edge", "decompress", s(&packed), "--output", s(&back)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    let size = std::fs::metadata(&back).unwrap().len();
    assert!(said.contains(&format!("{} (", back.display())), "{said}");
    assert!(said.contains("30 x 30 x"), "{said}");
    assert!(size > 0);

    let o = astro_fit(&["edge", "compress", s(&input), "-o", "json"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--out FILE"), "{}", stderr(&o));
    assert!(!Path::new("json").exists());

    for sub in ["filter", "compress", "decompress"] {
        let help = astro_fit(&["edge", sub, "--help"]);
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--out <OUT>"), "{sub}: {help}");
        assert!(
            !help.contains("--output") && !help.contains("-o,"),
            "{sub}: {help}"
        );
    }
}
