#!/usr/bin/env python3
"""pPXF 9.5.2 with its *own* preparation (the documented SDSS kinematics set-up of
`ppxf_example_kinematics_sdss.py`) on every real SDSS and MaNGA spectrum of the shared data;
prints one JSON document with V, sigma, h3, h4, chi2/DOF and the pixels fitted per spectrum.

Reference tool only (pip install ppxf==9.5.2 astropy); astro-fit never calls it at run time.
`apps/astro-fit/tests/it/ppxf_own_preparation.rs` runs it and compares astro-fit with it.

    python3 scripts/ppxf_own_preparation.py --data ../shared/data [--dump DIR]

The set-up, step by step as in pPXF's example (with the file's IVAR as noise):

1. Galaxy: log-sampled vacuum wavelengths are turned into air by ONE constant factor, the
   median of vac_to_air(lam)/lam (pPXF's example does this instead of converting the
   templates); flux divided by its median; noise = 1/sqrt(IVAR) / the same median.
2. Resolution: FWHM = 2.355 * wdisp * np.gradient(lam_air) for SDSS, lam/SRES for MaNGA;
   wavelengths and FWHM divided by (1 + z) (z from the file).
3. Templates: `sps_util.sps_lib(npz, velscale, {"lam", "fwhm"}, lam_range=[3500, 1e4])`, i.e.
   broadened over the whole E-MILES range with `ppxf_util.varsmooth` (variable width), then
   `log_rebin` at the galaxy velscale, divided by one common median, cut to 3500-10000 A.
   pPXF's E-MILES npz is not shipped with pip's ppxf (it is downloaded on first use), so it is
   built here from the shared E-MILES FITS files, 3000-11000 A, with the E-MILES resolution of
   Vazdekis et al. (2016) (see `emiles_fwhm`).
4. Good pixels: `determine_goodpixels(ln(lam_rest), [3500, 1e4])` (+-800 km/s around the gas
   lines, 900 km/s from the template range edges) AND the file's own mask (IVAR > 0, MaNGA
   DRP bad bits). The galaxy is cut to rest frame LAM_FIT, where the 3500-10000 A templates
   still cover it with pPXF's +-2900 km/s margin (only MaNGA spectra reach beyond it).
5. ppxf(..., moments=4, degree=20, start=[0, 200], lam=lam_rest, lam_temp=sps.lam_temp),
   Legendre polynomials (astro-fit has no trigonometric series), ftol 1e-8 so that pPXF is
   converged far below the tolerances compared.
"""
import argparse
import json
import os
import sys
import tempfile

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import glob  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
import ppxf  # noqa: E402
from ppxf.ppxf import ppxf as run_ppxf  # noqa: E402
import ppxf.ppxf_util as util  # noqa: E402
import ppxf.sps_util as sps_util  # noqa: E402

C = 299792.458
LAM_RANGE_TEMP = (3500.0, 1e4)
# Rest-frame range fitted: the template range shrunk by pPXF's 2000 + 900 km/s margin (and a
# pixel), so that pPXF's check that the templates cover galaxy[goodpixels] always holds.
LAM_FIT = (3540.0, 9880.0)
# Wavelengths kept in the npz given to sps_lib: beyond LAM_RANGE_TEMP by more than any kernel.
NPZ_RANGE = (3000.0, 11000.0)
MOMENTS, DEGREE, START = 4, 20, (0.0, 200.0)
# NOCOV, DEADFIBER, FORESTAR, DONOTUSE: the MaNGA DRP bits astro-fit treats as bad.
MANGA_BAD = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 10)


def emiles_fwhm(lam_air):
    """E-MILES FWHM (A): 5 A below 3060 A, 3 A to 3540 A, 2.51 A to 8950 A, then a constant
    sigma of 60 km/s (Vazdekis et al. 2016)."""
    fwhm = np.where(lam_air < 3060, 5.0, np.where(lam_air < 3540, 3.0, 2.51))
    red = 2 * np.sqrt(2 * np.log(2)) * 60 / C * lam_air
    return np.where(lam_air > 8950, np.maximum(red, 2.51), fwhm)


def build_npz(folder, path):
    """pPXF's sps_lib input (templates[npix, n_ages, n_metals], lam, fwhm, ages, metals,
    masses) from the E-MILES FITS files of the shared data."""
    files = sorted(glob.glob(os.path.join(folder, "E*.fits")))
    parsed = []
    for f in files:
        m = re.search(r"Z([mp])(\d+\.\d+)T(\d+\.\d+)", os.path.basename(f))
        metal = float(m.group(2)) * (-1 if m.group(1) == "m" else 1)
        parsed.append((float(m.group(3)), metal, f))
    ages = np.unique([p[0] for p in parsed])
    metals = np.unique([p[1] for p in parsed])
    hdr = fits.getheader(files[0])
    lam = hdr["CRVAL1"] + hdr["CDELT1"] * np.arange(hdr["NAXIS1"])
    # Only NPZ_RANGE is kept (1680-50000 A in the files): 6x less to broaden per spectrum.
    keep = (lam >= NPZ_RANGE[0]) & (lam <= NPZ_RANGE[1])
    templates = np.empty((keep.sum(), ages.size, metals.size))
    for age, metal, f in parsed:
        templates[:, np.searchsorted(ages, age), np.searchsorted(metals, metal)] = \
            fits.getdata(f)[keep]
    lam = lam[keep]
    np.savez(path, templates=templates, masses=np.ones((ages.size, metals.size)), lam=lam,
             ages=ages, metals=metals, fwhm=emiles_fwhm(lam))


def spectra_of(data):
    """(name, astro-fit CLI selection, lam_vac, flux, ivar, good, fwhm_obs, z) of every real
    SDSS and MaNGA spectrum in data/spectra."""
    folder = os.path.join(data, "spectra")
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*SDSS*.fits"))):
        with fits.open(path) as h:
            t = h["COADD"].data
            lam = 10 ** t["loglam"].astype(float)
            ivar, flux = t["ivar"].astype(float), t["flux"].astype(float)
            # wdisp is in pixels; the example's np.gradient is taken on the air wavelengths,
            # which are the vacuum ones times a constant.
            fwhm = 2.355 * t["wdisp"].astype(float) * np.gradient(lam * air_factor(lam))
            out.append((os.path.basename(path), [path], lam, flux, ivar,
                        (ivar > 0) & np.isfinite(flux), fwhm, float(h["SPECOBJ"].data["Z"][0])))
    for path in sorted(glob.glob(os.path.join(folder, "MaNGA*.fits*"))):
        with fits.open(path) as h:
            lam = h["WAVE"].data.astype(float)
            for row in range(h["FLUX"].data.shape[0]):
                flux = h["FLUX"].data[row].astype(float)
                ivar = h["IVAR"].data[row].astype(float)
                good = ((h["MASK"].data[row] & MANGA_BAD) == 0) & (ivar > 0) & np.isfinite(flux)
                sres = h["SRES"].data[row].astype(float)
                fwhm = lam * air_factor(lam) / sres
                out.append((f"{os.path.basename(path)}#{row}", [path, "--row", str(row)], lam,
                            flux, ivar, good, fwhm, float(h["Z"].data[row])))
    return out


def air_factor(lam_vac):
    """The example's single vacuum-to-air factor."""
    return np.median(util.vac_to_air(lam_vac) / lam_vac)


def fit(name, lam_vac, flux, ivar, good, fwhm_obs, z, npz, dump=None):
    lam_gal = lam_vac * air_factor(lam_vac) / (1 + z)
    fwhm_gal = fwhm_obs / (1 + z)
    keep = (lam_gal >= LAM_FIT[0]) & (lam_gal <= LAM_FIT[1])
    lam_gal, flux, ivar, good, fwhm_gal = (a[keep] for a in (lam_gal, flux, ivar, good, fwhm_gal))
    ln_lam = np.log(lam_gal)
    velscale = C * (ln_lam[-1] - ln_lam[0]) / (ln_lam.size - 1)
    goodpix = util.determine_mask(ln_lam, LAM_RANGE_TEMP) & good
    if not goodpix.any():
        return {"name": name, "error": "no good pixels"}
    scale = np.median(flux[good])
    galaxy = flux / scale
    noise = np.where(good, 1 / np.sqrt(np.where(good, ivar, 1.0)), 1e10) / scale
    galaxy = np.where(good, galaxy, 0.0)
    sps = sps_util.sps_lib(npz, velscale, {"lam": lam_gal, "fwhm": fwhm_gal},
                           lam_range=LAM_RANGE_TEMP)
    templates = sps.templates.reshape(sps.templates.shape[0], -1)
    pp = run_ppxf(templates, galaxy, noise, velscale, list(START), goodpixels=np.flatnonzero(goodpix),
                  moments=MOMENTS, degree=DEGREE, lam=lam_gal, lam_temp=sps.lam_temp, quiet=True,
                  ftol=1e-8)
    if dump:
        np.savez(os.path.join(dump, re.sub(r"[^A-Za-z0-9]+", "_", name) + ".npz"),
                 templates=templates, lam_temp=sps.lam_temp, galaxy=galaxy, noise=noise,
                 lam=lam_gal, good=goodpix, fwhm=fwhm_gal, bestfit=pp.bestfit)
    return {"name": name, "v": float(pp.sol[0]), "sigma": float(pp.sol[1]),
            "h3": float(pp.sol[2]), "h4": float(pp.sol[3]), "chi2": float(pp.chi2),
            "n_good": int(pp.goodpixels.size), "velscale": float(velscale), "redshift": z}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data"))
    ap.add_argument("--dump", help="folder for the prepared arrays of each spectrum (npz)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "emiles.npz")
        build_npz(os.path.join(args.data, "templates/emiles"), npz)
        for name, selection, lam, flux, ivar, good, fwhm, z in spectra_of(args.data):
            result = fit(name, lam, flux, ivar, good, fwhm, z, npz, args.dump)
            result["args"] = selection
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    print(json.dumps({"ppxf_version": ppxf.__version__,
                      "settings": {"moments": MOMENTS, "degree": DEGREE, "start": START,
                                   "lam_range_temp": LAM_RANGE_TEMP, "lam_fit": LAM_FIT,
                                   "emission_mask_kms": 800, "ftol": 1e-8},
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
