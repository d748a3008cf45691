use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::images::{ImageDescription, ImageType};

use super::*;

pub(crate) fn cube_file(name: &str) -> PathBuf {
    let path = crate::synthetic::shared_data_dir().join("cubes").join(name);
    assert!(path.is_file(), "test data {} missing", path.display());
    path
}

fn new_fits(path: &Path, primary: Option<&ImageDescription>) -> FitsFile {
    let builder = FitsFile::create(path);
    match primary {
        Some(desc) => builder.with_custom_primary(desc).open(),
        None => builder.open(),
    }
    .expect("create fits")
}

/// A MEGARA-layout cube: primary 3-D image, VARIANCE extension, linear air WCS.
/// Flux = x + 10 y + 100 k; plane `nan_plane` is all NaN; variance of spaxel (1, 2) is 0.
pub(crate) fn write_megara(path: &Path, nx: usize, ny: usize, nwave: usize, nan_plane: usize) {
    let desc = ImageDescription {
        data_type: ImageType::Float,
        dimensions: &[nwave, ny, nx],
    };
    let mut f = new_fits(path, Some(&desc));
    let mut flux = Vec::new();
    let mut var = Vec::new();
    for k in 0..nwave {
        for y in 0..ny {
            for x in 0..nx {
                let v = (x + 10 * y + 100 * k) as f32;
                flux.push(if k == nan_plane { f32::NAN } else { v });
                var.push(if (x, y) == (1, 2) { 0.0 } else { 4.0 });
            }
        }
    }
    let primary = f.primary_hdu().unwrap();
    primary.write_image(&mut f, &flux).unwrap();
    for (k, v) in [
        ("INSTRUME", "MEGARA"),
        ("CTYPE3", "AWAV"),
        ("CUNIT3", "Angstrom"),
    ] {
        primary.write_key(&mut f, k, v).unwrap();
    }
    for (k, v) in [
        ("CRVAL3", 6000.0),
        ("CRPIX3", 1.0),
        ("CDELT3", 0.5),
        ("CDELT1", -1.5e-4),
        ("CDELT2", 1.5e-4),
    ] {
        primary.write_key(&mut f, k, v).unwrap();
    }
    let hdu = f.create_image("VARIANCE", &desc).unwrap();
    hdu.write_image(&mut f, &var).unwrap();
}

#[test]
fn reads_the_manga_format_synthetic_cube_through_gzip() {
    let mut cube = Cube::open(cube_file("synthetic-manga-seed7-LOGCUBE.fits.gz")).unwrap();
    let meta = cube.meta().clone();
    assert_eq!(meta.format, CubeFormat::MangaLogcube);
    assert_eq!((meta.nx, meta.ny, meta.nwave()), (32, 32, 4563));
    assert_eq!(meta.medium, WavelengthMedium::Vacuum);
    assert!(meta.log_sampled);
    assert!((meta.wavelength[0] - 3621.596).abs() < 1e-2);
    let r = meta.resolution.as_ref().expect("SPECRES");
    assert!(r[0] > 1000.0 && r[0] < 3000.0, "R = {}", r[0]);
    assert!((meta.pixel_scale_arcsec - 0.5).abs() < 1e-6);
    assert_eq!(meta.noise_stored_as, Some(NoiseKind::InverseVariance));
    assert_eq!(meta.redshift, Some(0.018));
    // (0, 0) is outside the hexagonal footprint (NOCOV|DONOTUSE), (8, 2) is inside.
    let block = cube.read_rows(0..3).unwrap();
    assert!(block.spectrum(0, 0).good.iter().all(|g| !g));
    let inside = block.spectrum(8, 2);
    let ngood = inside.good.iter().filter(|g| **g).count();
    assert!(ngood > 4000, "{ngood} good pixels in a footprint spaxel");
    assert!(
        inside
            .ivar
            .iter()
            .zip(inside.good)
            .all(|(v, g)| (*v > 0.0) == *g)
    );
    // The plane reader and the row reader agree pixel for pixel.
    let planes = cube.read_planes(2000..2002).unwrap();
    let (x, y, k) = (8, 2, 2001);
    let from_plane = planes.flux[((k - 2000) * meta.ny + y) * meta.nx + x];
    assert_eq!(from_plane, inside.flux[k]);
    assert!(from_plane > 0.0);
}

#[test]
fn reads_real_muse_cubes_with_and_without_dq() {
    let mut cube = Cube::open(cube_file("minicube.fits")).unwrap();
    let meta = cube.meta().clone();
    assert_eq!(meta.format, CubeFormat::Muse);
    assert_eq!((meta.nx, meta.ny, meta.nwave()), (40, 40, 3681));
    assert_eq!(meta.medium, WavelengthMedium::Air);
    assert!(!meta.log_sampled);
    assert!((meta.wavelength[0] - 4749.890625).abs() < 1e-9);
    assert!((meta.wavelength[1] - meta.wavelength[0] - 1.25).abs() < 1e-9);
    assert!((meta.pixel_scale_arcsec - 0.2).abs() < 1e-6);
    assert_eq!(meta.noise_stored_as, Some(NoiseKind::Variance));
    assert!(meta.resolution.is_none());
    let block = cube.read_rows(20..21).unwrap();
    let s = block.spectrum(20, 20);
    let good = s.good.iter().filter(|g| **g).count();
    assert!(good > 3000);
    // Variance became inverse variance: positive and finite where good.
    assert!(
        s.ivar
            .iter()
            .zip(s.good)
            .all(|(v, g)| !*g || (*v > 0.0 && v.is_finite()))
    );

    let mosaic = Cube::open(cube_file("subcub_mosaic.fits")).unwrap();
    let meta = mosaic.meta();
    assert_eq!(meta.format, CubeFormat::Muse);
    assert_eq!((meta.nx, meta.ny, meta.nwave()), (30, 30, 500));
    // Rotated CD matrix: the scale is still 0.2 arcsec.
    assert!((meta.pixel_scale_arcsec - 0.2).abs() < 1e-4);
}

#[test]
fn reads_a_megara_cube_in_the_primary_hdu_with_axes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("megara.fits");
    write_megara(&path, 5, 3, 7, 4);
    let mut cube = Cube::open(&path).unwrap();
    let meta = cube.meta().clone();
    assert_eq!(meta.format, CubeFormat::Megara);
    assert_eq!((meta.nx, meta.ny, meta.nwave()), (5, 3, 7));
    assert_eq!(meta.medium, WavelengthMedium::Air);
    assert_eq!(meta.wavelength[2], 6001.0);
    assert!((meta.pixel_scale_arcsec - 0.54).abs() < 1e-9);
    let block = cube.read_rows(1..3).unwrap();
    let s = block.spectrum(3, 2);
    for k in [0, 1, 6] {
        assert_eq!(s.flux[k], (3 + 20 + 100 * k) as f32);
        assert_eq!(s.ivar[k], 0.25);
    }
    // The all-NaN plane and the zero-variance spaxel are flagged, not passed on.
    assert!(!s.good[4] && s.flux[4] == 0.0);
    assert!(block.spectrum(1, 2).good.iter().all(|g| !g));
    let planes = cube.read_planes(5..7).unwrap();
    assert_eq!(
        planes.flux[(3 + 2) * 5 + 4], /* plane 6, y 2, x 4 */
        (4 + 20 + 600) as f32
    );
    assert!(matches!(
        cube.read_rows(2..4),
        Err(CubeError::RowsOutOfRange { ny: 3, .. })
    ));
    assert!(matches!(
        cube.read_planes(6..9),
        Err(CubeError::PlanesOutOfRange { nwave: 7, .. })
    ));
}

#[test]
fn unknown_files_are_refused_naming_what_was_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.fits");
    let desc = ImageDescription {
        data_type: ImageType::Float,
        dimensions: &[4, 4],
    };
    let mut f = new_fits(&path, None);
    let primary = f.primary_hdu().unwrap();
    primary.write_key(&mut f, "INSTRUME", "WFC3").unwrap();
    let hdu = f.create_image("SCI", &desc).unwrap();
    hdu.write_image(&mut f, &[0f32; 16]).unwrap();
    drop(f);
    let err = Cube::open(&path).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CubeError::UnknownFormat { .. }), "{text}");
    assert!(text.contains("1:SCI(4x4)"), "{text}");
    assert!(text.contains("INSTRUME[0]=WFC3"), "{text}");
}

#[test]
fn truncated_and_corrupt_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(cube_file("subcub_mosaic.fits")).unwrap();
    let cut = dir.path().join("cut.fits");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Cube::open(&cut).unwrap_err();
    assert!(matches!(err, CubeError::Truncated { .. }), "{err}");

    let garbage = dir.path().join("garbage.fits");
    std::fs::write(&garbage, vec![b'x'; 5760]).unwrap();
    let err = Cube::open(&garbage).unwrap_err();
    assert!(
        matches!(err, CubeError::Open { .. } | CubeError::Truncated { .. }),
        "{err}"
    );

    let gz = std::fs::read(cube_file("synthetic-manga-seed7-LOGCUBE.fits.gz")).unwrap();
    let cut_gz = dir.path().join("cut.fits.gz");
    std::fs::write(&cut_gz, &gz[..gz.len() / 3]).unwrap();
    let err = Cube::open(&cut_gz).unwrap_err();
    assert!(
        matches!(err, CubeError::Open { .. } | CubeError::Truncated { .. }),
        "{err}"
    );

    let err = Cube::open(dir.path().join("absent.fits")).unwrap_err();
    assert!(matches!(err, CubeError::Open { .. }), "{err}");
}

#[test]
fn a_manga_file_with_mismatched_ivar_is_a_layout_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-LOGCUBE.fits");
    let mut f = new_fits(&path, None);
    let cube = ImageDescription {
        data_type: ImageType::Float,
        dimensions: &[6, 2, 2],
    };
    let small = ImageDescription {
        data_type: ImageType::Float,
        dimensions: &[5, 2, 2],
    };
    let wave = ImageDescription {
        data_type: ImageType::Double,
        dimensions: &[6],
    };
    f.create_image("FLUX", &cube).unwrap();
    f.create_image("IVAR", &small).unwrap();
    f.create_image("WAVE", &wave).unwrap();
    drop(f);
    let err = Cube::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            CubeError::Layout {
                format: CubeFormat::MangaLogcube,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("IVAR"), "{err}");
}

/// A plain cube is read through a memory map, a gzipped one from cfitsio's in-memory copy:
/// the same cube gives the same pixels both ways, and a plain file cut short is still refused
/// before any map is made.
#[test]
fn a_mapped_plain_cube_reads_what_its_gzipped_copy_reads() {
    use std::io::Read;
    let gz = cube_file("synthetic-manga-seed7-LOGCUBE.fits.gz");
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("seed7-LOGCUBE.fits");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    std::fs::write(&plain, &bytes).unwrap();
    let mut mapped = Cube::open(&plain).unwrap();
    assert!(mapped._mapped.is_some(), "a plain FITS file is mapped");
    let mut inflated = Cube::open(&gz).unwrap();
    assert!(inflated._mapped.is_none());
    let ny = mapped.meta().ny;
    for rows in [0..1, 7..9, ny - 2..ny] {
        let a = mapped.read_rows(rows.clone()).unwrap();
        let b = inflated.read_rows(rows.clone()).unwrap();
        assert_eq!(a.flux, b.flux, "rows {rows:?}");
        assert_eq!(a.ivar, b.ivar, "rows {rows:?}");
        assert_eq!(a.good, b.good, "rows {rows:?}");
    }
    let planes = 100..140;
    let a = mapped.read_planes(planes.clone()).unwrap();
    let b = inflated.read_planes(planes).unwrap();
    assert_eq!((a.flux, a.ivar, a.good), (b.flux, b.ivar, b.good));

    let cut = dir.path().join("cut-LOGCUBE.fits");
    std::fs::write(&cut, &bytes[..bytes.len() - 2880 * 10]).unwrap();
    assert!(matches!(Cube::open(&cut), Err(CubeError::Truncated { .. })));
}

/// A FITS file of one primary header made of `cards` (`KEY`, value as FITS writes it).
fn header_only(cards: &[(&str, &str)]) -> Vec<u8> {
    let mut text: String = cards
        .iter()
        .map(|(key, value)| format!("{key:<8}= {value:>20}{:50}", ""))
        .collect();
    text.push_str(&format!("{:<80}", "END"));
    let mut bytes = text.into_bytes();
    bytes.resize(bytes.len().div_ceil(2880) * 2880, b' ');
    bytes
}

/// Found by the `fits_cube` fuzz target (fuzz/): a header whose axes multiply to 0 made the
/// truncation probe read pixel `0 - 1` (a panic in debug builds), and axes whose product
/// overflows would too. Both are typed errors now.
#[test]
fn headers_with_empty_or_unaddressable_axes_are_refused_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    for (name, axes) in [
        ("empty.fits", ["3", "0", "4"]),
        ("huge.fits", ["2147483647", "2147483647", "2147483647"]),
    ] {
        let path = dir.path().join(name);
        let mut cards = vec![("SIMPLE", "T"), ("BITPIX", "-32"), ("NAXIS", "3")];
        cards.extend([
            ("NAXIS1", axes[0]),
            ("NAXIS2", axes[1]),
            ("NAXIS3", axes[2]),
        ]);
        cards.extend([("EXTEND", "T"), ("INSTRUME", "'MEGARA  '")]);
        std::fs::write(&path, header_only(&cards)).unwrap();
        let outcome = std::panic::catch_unwind(|| Cube::open(&path));
        let err = outcome
            .unwrap_or_else(|_| panic!("{name}: Cube::open panicked"))
            .expect_err(name);
        assert!(!err.to_string().is_empty(), "{name}");
    }
}

/// Found by the `fits_cube` fuzz target: cfitsio sizes its in-memory copy of a compressed file
/// from the file's trailer, so a gzip file declaring an impossible size (here 0, which cfitsio
/// takes as 4 GiB) made it allocate 4 GiB. Such a file, and compressions astro-fit does not
/// read, are refused before cfitsio sees them; a real gzip cube still opens.
#[test]
fn compressed_files_with_impossible_sizes_are_refused_before_cfitsio_allocates() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let lying = dir.path().join("lying.fits");
    let mut bytes = vec![0x1f, 0x8b];
    bytes.extend(header_only(&[
        ("SIMPLE", "T"),
        ("BITPIX", "8"),
        ("NAXIS", "0"),
    ]));
    bytes.extend([0u8; 4]);
    std::fs::write(&lying, &bytes).unwrap();
    let err = Cube::open(&lying).unwrap_err();
    assert!(
        matches!(err, CubeError::Open { .. }) && err.to_string().contains("gzip trailer"),
        "{err}"
    );
    let zipped = dir.path().join("zipped.fits");
    std::fs::write(&zipped, b"PK\x03\x04 not a FITS file").unwrap();
    let err = Cube::open(&zipped).unwrap_err();
    assert!(err.to_string().contains("plain or gzip"), "{err}");

    let plain = dir.path().join("megara.fits");
    write_megara(&plain, 3, 2, 4, 9);
    let gz = dir.path().join("megara.fits.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    encoder.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    encoder.finish().unwrap();
    let cube = Cube::open(&gz).unwrap();
    assert_eq!(
        (cube.meta().nx, cube.meta().ny, cube.meta().nwave()),
        (3, 2, 4)
    );
}
