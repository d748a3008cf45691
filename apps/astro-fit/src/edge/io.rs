//! FITS in and out for [`SpectralCube`].
//!
//! Reading: the cube module recognises the file (MaNGA, MUSE, MEGARA) and gives its geometry;
//! then every 3-D image HDU of that geometry is read as stored (its own element type, masked
//! pixels untouched) so that lossless really means the file's bits, and every 1-D image of
//! `nwave` samples travels as an aux vector. Every HDU's header travels whole (every card but
//! the data layout's, see [`crate::fits_cards`]), so writing gives back the same HDU names and
//! the same headers, and the cube module reads the result again.

use std::path::Path;

use fitsio::FitsFile;
use fitsio::hdu::{FitsHdu, HduInfo};
use fitsio::images::{ImageDescription, ImageType};

use super::{AuxVector, DType, EdgeError, HduHeader, Plane, Role, Samples, SpectralCube};
use crate::cube::Cube;
use crate::fits_cards;

fn fits_err(path: &Path, e: impl std::fmt::Display) -> EdgeError {
    EdgeError::Fits {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Which role an HDU plays, from its name (the conventions of MaNGA, MUSE and MEGARA).
pub fn role_for(name: &str) -> Role {
    match name.to_ascii_uppercase().as_str() {
        "FLUX" | "DATA" | "PRIMARY" => Role::Flux,
        "IVAR" => Role::Ivar,
        "STAT" | "VAR" | "VARIANCE" => Role::Variance,
        "MASK" | "DQ" | "BADPIX" => Role::Mask,
        _ => Role::Other,
    }
}

/// `out[k * rows + s] = v[s * cols + k]` (and back, with rows and cols swapped).
fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for s in 0..rows {
        for k in 0..cols {
            out[k * rows + s] = v[s * cols + k];
        }
    }
    out
}

macro_rules! map_samples {
    ($samples:expr, $v:ident => $body:expr) => {
        match $samples {
            Samples::U8($v) => Samples::U8($body),
            Samples::I16($v) => Samples::I16($body),
            Samples::I32($v) => Samples::I32($body),
            Samples::I64($v) => Samples::I64($body),
            Samples::F32($v) => Samples::F32($body),
            Samples::F64($v) => Samples::F64($body),
        }
    };
}

fn read_samples(
    file: &mut FitsFile,
    hdu: &FitsHdu,
    image_type: &ImageType,
) -> fitsio::errors::Result<Samples> {
    Ok(match image_type {
        ImageType::UnsignedByte => Samples::U8(hdu.read_image(file)?),
        ImageType::Short | ImageType::Byte => Samples::I16(hdu.read_image(file)?),
        ImageType::Long | ImageType::UnsignedShort => Samples::I32(hdu.read_image(file)?),
        ImageType::LongLong | ImageType::UnsignedLong => Samples::I64(hdu.read_image(file)?),
        ImageType::Float => Samples::F32(hdu.read_image(file)?),
        ImageType::Double => Samples::F64(hdu.read_image(file)?),
    })
}

/// Reads a cube file (any format the cube module recognises) as stored.
pub fn read_fits_cube(path: &Path) -> Result<SpectralCube, EdgeError> {
    let meta = Cube::open(path)
        .map_err(|e| EdgeError::InvalidCube(e.to_string()))?
        .meta()
        .clone();
    let (nx, ny, nwave) = (meta.nx, meta.ny, meta.nwave());
    let mut file = FitsFile::open(path).map_err(|e| fits_err(path, e))?;
    let n_hdus = file.num_hdus().map_err(|e| fits_err(path, e))?;
    let mut cube = SpectralCube {
        nx,
        ny,
        nwave,
        planes: Vec::new(),
        aux: Vec::new(),
        headers: Vec::new(),
    };
    for index in 0..n_hdus {
        let hdu = file.hdu(index).map_err(|e| fits_err(path, e))?;
        let name = match hdu.name(&mut file) {
            Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ if index == 0 => "PRIMARY".to_string(),
            _ => format!("HDU{index}"),
        };
        // `hdu()` made this HDU cfitsio's current one, whose cards are read.
        let cards = fits_cards::read_cards(&mut file).map_err(|e| fits_err(path, e))?;
        cube.headers.push(HduHeader {
            hdu: name.clone(),
            cards: cards
                .into_iter()
                .filter(|c| !fits_cards::describes_layout(c))
                .collect(),
        });
        let HduInfo::ImageInfo { shape, image_type } = &hdu.info else {
            continue;
        };
        if shape.as_slice() == [nwave, ny, nx] {
            let samples =
                read_samples(&mut file, &hdu, image_type).map_err(|e| fits_err(path, e))?;
            cube.planes.push(Plane {
                role: role_for(&name),
                name,
                samples: map_samples!(samples, v => transpose(&v, nwave, nx * ny)),
            });
        } else if shape.as_slice() == [nwave] {
            let values: Vec<f64> = hdu.read_image(&mut file).map_err(|e| fits_err(path, e))?;
            cube.aux.push(AuxVector { name, values });
        }
    }
    if !cube
        .aux
        .iter()
        .any(|a| matches!(a.name.as_str(), "WAVE" | "WAVELENGTH"))
    {
        cube.aux.push(AuxVector {
            name: "WAVELENGTH".into(),
            values: meta.wavelength.clone(),
        });
    }
    cube.validate()?;
    Ok(cube)
}

fn image_type(dtype: DType) -> ImageType {
    match dtype {
        DType::U8 => ImageType::UnsignedByte,
        DType::I16 => ImageType::Short,
        DType::I32 => ImageType::Long,
        DType::I64 => ImageType::LongLong,
        DType::F32 => ImageType::Float,
        DType::F64 => ImageType::Double,
    }
}

/// Appends the carried header of HDU `name` to the current HDU of `file`.
fn write_header(
    file: &mut FitsFile,
    name: &str,
    headers: &[HduHeader],
) -> fitsio::errors::Result<()> {
    match headers.iter().find(|h| h.hdu == name) {
        Some(header) => fits_cards::replace_cards(file, &header.cards),
        None => Ok(()),
    }
}

fn path_str(path: &Path) -> Result<&str, EdgeError> {
    path.to_str()
        .ok_or_else(|| EdgeError::InvalidParameter(format!("{} is not UTF-8", path.display())))
}

/// Writes `cube` as a FITS file; `compression(plane)` may name a cfitsio compression spec
/// (extended filename syntax, e.g. `compress R 1,1,4563; q 4`) for that plane's HDU.
pub(crate) fn write_fits_with(
    cube: &SpectralCube,
    path: &Path,
    compression: impl Fn(&Plane) -> Option<String>,
) -> Result<(), EdgeError> {
    cube.validate()?;
    let plain = path_str(path)?;
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| EdgeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
    }
    let err = |e: fitsio::errors::Error| fits_err(path, e);
    {
        let mut file = FitsFile::create(path).open().map_err(err)?;
        file.primary_hdu().map_err(err)?;
        write_header(&mut file, "PRIMARY", &cube.headers).map_err(err)?;
    }
    let (nspec, nwave) = (cube.nspec(), cube.nwave);
    for plane in &cube.planes {
        // cfitsio applies a compression spec to every image created through that handle, so
        // each plane gets its own handle and its own spec.
        let target = match compression(plane) {
            Some(spec) => format!("{plain}[{spec}]"),
            None => plain.to_string(),
        };
        let mut file = FitsFile::edit(&target).map_err(err)?;
        let description = ImageDescription {
            data_type: image_type(plane.samples.dtype()),
            dimensions: &[nwave, cube.ny, cube.nx],
        };
        let hdu = file
            .create_image(plane.name.as_str(), &description)
            .map_err(err)?;
        let fits_order = map_samples!(&plane.samples, v => transpose(v, nspec, nwave));
        match &fits_order {
            Samples::U8(v) => hdu.write_image(&mut file, v),
            Samples::I16(v) => hdu.write_image(&mut file, v),
            Samples::I32(v) => hdu.write_image(&mut file, v),
            Samples::I64(v) => hdu.write_image(&mut file, v),
            Samples::F32(v) => hdu.write_image(&mut file, v),
            Samples::F64(v) => hdu.write_image(&mut file, v),
        }
        .map_err(err)?;
        write_header(&mut file, &plane.name, &cube.headers).map_err(err)?;
    }
    let mut file = FitsFile::edit(path).map_err(err)?;
    for aux in &cube.aux {
        let description = ImageDescription {
            data_type: ImageType::Double,
            dimensions: &[aux.values.len()],
        };
        let hdu = file
            .create_image(aux.name.as_str(), &description)
            .map_err(err)?;
        hdu.write_image(&mut file, &aux.values).map_err(err)?;
        write_header(&mut file, &aux.name, &cube.headers).map_err(err)?;
    }
    Ok(())
}

/// Writes `cube` as a plain (uncompressed) FITS file.
pub fn write_fits_cube(cube: &SpectralCube, path: &Path) -> Result<(), EdgeError> {
    write_fits_with(cube, path, |_| None)
}
