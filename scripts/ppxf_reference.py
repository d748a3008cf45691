#!/usr/bin/env python3
"""Run pPXF on the real SDSS, MaNGA and SAURON spectra of the shared data with the settings
astro-fit's comparison test uses, and write a small JSON of the results.

Reference tool only (pip install ppxf astropy); nothing here is used by astro-fit at run time.

    cargo build --release -p astro-fit
    python3 scripts/ppxf_reference.py --data ../shared/data --astro-fit target/release/astro-fit \
        --out apps/astro-fit/tests/data/ppxf_reference.json

Two pPXF runs per spectrum (apps/astro-fit/tests/it/ppxf_compare.rs compares with both):

1. Same inputs (the fields at the top level of each result): `astro-fit fit-spectrum ...
   --save-inputs` writes the arrays it fits (rest-frame spectrum, noise, good pixels, templates
   broadened and log-rebinned by astro-fit) and pPXF fits exactly those. The command line is
   stored with the result so the test fits the very same thing.
2. pPXF's own preparation (`own_preparation`): templates prepared here with pPXF's tools:
   E-MILES (150 SSPs, air, converted to the galaxy's medium), broadened to the galaxy
   resolution with pPXF's exact constant-width `varsmooth` on 20 A segments (see
   `piecewise_smooth`), log-rebinned with pPXF's `log_rebin`, all divided by one median;
   galaxy de-redshifted by the file's redshift, rest frame 3600-8900 A, normalised by its
   median; noise from IVAR; good pixels: the file's mask, minus +-800 km/s around the usual
   emission lines.

Both: moments 2, additive degree 4, no multiplicative polynomial, start (0, 150); ftol 1e-8 so
pPXF's solution is converged well below the 2 km/s / 3% comparison tolerance (its default
1e-4 stops early on flat chi2 surfaces of low-S/N spectra).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from astropy.io import fits
from ppxf.ppxf import ppxf
import ppxf.ppxf_util as util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppxf_bench import fit_one, read_inputs  # noqa: E402

C = 299792.458
LAM_RANGE = (3600.0, 8900.0)
# NOCOV, DEADFIBER, FORESTAR, DONOTUSE: astro-fit's DRP3_BAD_BITS (LOWCOV alone is
# informational; the DRP sets DONOTUSE where coverage is too low to use).
MANGA_BAD = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 10)


def emiles_fwhm(lam_air):
    """E-MILES resolution: 5 A below 3060, 3 A to 3540, 2.51 A to 8950, then sigma = 60 km/s."""
    fwhm = np.where(lam_air < 3060, 5.0, np.where(lam_air < 3540, 3.0, 2.51))
    red = 2 * np.sqrt(2 * np.log(2)) * 60 / C * lam_air
    return np.where(lam_air > 8950, np.maximum(red, 2.51), fwhm)


def load_emiles(folder):
    files = sorted(glob.glob(os.path.join(folder, "E*.fits")))
    hdr = fits.getheader(files[0])
    lam = hdr["CRVAL1"] + hdr["CDELT1"] * np.arange(hdr["NAXIS1"])
    spectra = np.column_stack([fits.getdata(f).astype(float) for f in files])
    return lam, spectra


def piecewise_smooth(lam, spec, sigma, segment=20.0):
    """Gaussian broadening by pPXF's exact constant-width `varsmooth` branch (analytic Fourier
    transform of the Gaussian) on segments of `segment` A within which the width is taken as
    constant. pPXF's variable-width branch (a coordinate stretch with linear interpolation)
    adds extra broadening when sigma is below ~1 pixel, as when matching SDSS to E-MILES."""
    out = np.empty_like(spec)
    edges = np.arange(lam[0], lam[-1] + segment, segment)
    for a, b in zip(edges[:-1], edges[1:]):
        seg = (lam >= a) & (lam < b)
        if not seg.any():
            continue
        s = float(np.mean(sigma[seg]))
        pad = (lam >= a - 10 * s - 10) & (lam < b + 10 * s + 10)
        if s <= 0:
            out[seg] = spec[seg]
            continue
        sm = util.varsmooth(lam[pad], spec[pad], s)
        out[seg] = sm[seg[pad]]
    return out


def prepare_templates(lam_air, spectra, vacuum, lam_gal, fwhm_gal, velscale):
    lo, hi = lam_gal[0] / np.exp(3300 / C), lam_gal[-1] * np.exp(3300 / C)
    lam_t = util.air_to_vac(lam_air) if vacuum else lam_air
    ok = (lam_t > lo) & (lam_t < hi)
    lam_t, spec, lam_air = lam_t[ok], spectra[ok], lam_air[ok]
    fwhm_g = np.interp(lam_t, lam_gal, fwhm_gal)
    sigma = np.sqrt(np.clip(fwhm_g**2 - emiles_fwhm(lam_air) ** 2, 0, None)) / np.sqrt(8 * np.log(2))
    # Broaden on the uniform air grid (the width in A differs by < 0.03% in vacuum).
    spec = piecewise_smooth(lam_air, spec, sigma)
    templates, ln_lam_t = util.log_rebin(lam_t, spec, velscale=velscale)[:2]
    templates /= np.median(templates[templates > 0])
    return templates, np.exp(ln_lam_t)


def fit(name, lam_obs, flux, ivar, good, fwhm_obs, z, vacuum, log_sampled, tpl):
    if log_sampled:
        ln_lam = np.log(lam_obs)
    else:
        flux_good = np.where(good, flux, 0.0)
        lam_range = lam_obs[[0, -1]]
        flux, ln_lam = util.log_rebin(lam_range, flux_good, velscale=None)[:2]
        bad = util.log_rebin(lam_range, (~good).astype(float), velscale=None)[0]
        good = bad == 0
        ivar = None
    ln_rest = ln_lam - np.log1p(z)
    keep = (ln_rest >= np.log(LAM_RANGE[0])) & (ln_rest <= np.log(LAM_RANGE[1]))
    ln_rest, flux, good = ln_rest[keep], flux[keep], good[keep]
    ivar = None if ivar is None else ivar[keep]
    lam_rest = np.exp(ln_rest)
    velscale = C * (ln_rest[-1] - ln_rest[0]) / (ln_rest.size - 1)
    if not good.any():
        return {"name": name, "error": "no good pixels"}
    scale = abs(np.median(flux[good]))
    galaxy = np.where(good, flux / scale, 0.0)
    if ivar is None:
        noise = np.ones_like(galaxy)
    else:
        noise = np.where(good, 1 / np.sqrt(np.where(good, ivar, 1.0)) / scale, 1.0)
    lam_air = util.vac_to_air(lam_rest) if vacuum else lam_rest
    good &= util.determine_mask(np.log(lam_air), [1000.0, 1e5], width=800)
    fwhm_rest = (np.full_like(lam_rest, fwhm_obs) if np.isscalar(fwhm_obs)
                 else np.interp(lam_rest * (1 + z), *fwhm_obs) / (1 + z))
    templates, lam_temp = prepare_templates(*tpl, vacuum, lam_rest, fwhm_rest, velscale)
    pp = ppxf(templates, galaxy, noise, velscale, [0.0, 150.0], moments=2, degree=4, mdegree=0,
              lam=lam_rest, lam_temp=lam_temp, goodpixels=np.flatnonzero(good), quiet=True,
              ftol=1e-8)
    return {"name": name, "v": float(pp.sol[0]), "sigma": float(pp.sol[1]),
            "v_error": float(pp.error[0]), "sigma_error": float(pp.error[1]),
            "chi2": float(pp.chi2), "n_good": int(pp.goodpixels.size), "redshift": float(z)}


def same_inputs(astro_fit, data, cli):
    """pPXF on the arrays `astro-fit fit-spectrum CLI --save-inputs` writes."""
    args = [a.replace("{data}", data) for a in cli]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.fits")
        run = subprocess.run([astro_fit, "fit-spectrum", *args, "--save-inputs", path, "-o", "json"],
                             capture_output=True, text=True)
        if not os.path.exists(path):
            raise RuntimeError(f"astro-fit {' '.join(args)}: {run.stderr}")
        inputs = read_inputs(path)
        pp = fit_one(inputs, 0, ftol=1e-8)
    g = pp.goodpixels
    # The objective itself, so the test can check astro-fit's minimum is at least as deep.
    chi2_sum = np.sum(((inputs["galaxy"][0][g] - pp.bestfit[g]) / inputs["noise"][0][g]) ** 2)
    return {"v": float(pp.sol[0]), "sigma": float(pp.sol[1]), "v_error": float(pp.error[0]),
            "sigma_error": float(pp.error[1]), "chi2": float(pp.chi2),
            "chi2_sum": float(chi2_sum), "n_good": int(g.size)}


COMMON_CLI = ["--templates", "{data}/templates/emiles", "--lam-range", "3600", "8900",
              "--emission-mask-kms", "800", "--moments", "2", "--degree", "4", "--mdegree", "0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data"))
    ap.add_argument("--astro-fit", default=os.path.join(os.path.dirname(__file__),
                                                        "../target/release/astro-fit"))
    ap.add_argument("--out", default="-")
    args = ap.parse_args()
    tpl = load_emiles(os.path.join(args.data, "templates/emiles"))
    spectra_dir = os.path.join(args.data, "spectra")
    results = []

    def record(name, own, cli):
        if "error" not in own:
            own = {k: own[k] for k in ("v", "sigma", "v_error", "sigma_error", "chi2", "n_good")}
            result = {"name": name, "cli": cli, **same_inputs(args.astro_fit, args.data, cli),
                      "own_preparation": own}
        else:
            result = {"name": name, "cli": cli, "error": own["error"]}
        results.append(result)

    for fname in ["NGC4636_SDSS_DR12.fits", "NGC3522_SDSS_DR18.fits", "NGC3073_SDSS_DR18.fits"]:
        with fits.open(os.path.join(spectra_dir, fname)) as h:
            t = h["COADD"].data
            lam = 10 ** t["loglam"].astype(float)
            dlam = np.gradient(lam)
            fwhm = (lam, 2 * np.sqrt(2 * np.log(2)) * t["wdisp"] * dlam)
            ivar = t["ivar"].astype(float)
            flux = t["flux"].astype(float)
            good = (ivar > 0) & np.isfinite(flux)
            z = float(h["SPECOBJ"].data["Z"][0])
            record(fname, fit(fname, lam, flux, ivar, good, fwhm, z, True, True, tpl),
                   ["{data}/spectra/" + fname, *COMMON_CLI])
    for fname in ["MaNGA_test_spectra.fits.gz", "MaNGA_multicomp_test_spectra.fits.gz"]:
        with fits.open(os.path.join(spectra_dir, fname)) as h:
            wave = h["WAVE"].data.astype(float)
            for row in range(h["FLUX"].data.shape[0]):
                flux = h["FLUX"].data[row].astype(float)
                ivar = h["IVAR"].data[row].astype(float)
                good = ((h["MASK"].data[row] & MANGA_BAD) == 0) & (ivar > 0) & np.isfinite(flux)
                fwhm = (wave, wave / h["SRES"].data[row])
                z = float(h["Z"].data[row])
                name = f"{fname}#{row}"
                record(name, fit(name, wave, flux, ivar, good, fwhm, z, True, True, tpl),
                       ["{data}/spectra/" + fname, "--row", str(row), *COMMON_CLI])
    with fits.open(os.path.join(spectra_dir, "NGC4550_SAURON.fits")) as h:
        flux = h[0].data.astype(float)
        lam = h[0].header["CRVAL1"] + h[0].header["CDELT1"] * np.arange(flux.size)
        name = "NGC4550_SAURON.fits"
        # The file carries neither redshift nor resolution: pPXF's example values.
        record(name, fit(name, lam, flux, None, np.isfinite(flux), 4.2, 0.0015, False, False, tpl),
               ["{data}/spectra/NGC4550_SAURON.fits", "--redshift", "0.0015", "--fwhm", "4.2",
                *COMMON_CLI])
    doc = {"command": "python3 scripts/ppxf_reference.py --data ../shared/data "
                      "--astro-fit target/release/astro-fit "
                      "--out apps/astro-fit/tests/data/ppxf_reference.json",
           "ppxf_version": __import__("ppxf").__version__,
           "settings": {"moments": 2, "degree": 4, "mdegree": 0, "velscale_ratio": 1,
                        "lam_range_rest": LAM_RANGE, "start": [0, 150], "templates": "E-MILES 150",
                        "emission_line_half_width_kms": 800, "ftol": 1e-8},
           "results": results}
    text = json.dumps(doc, indent=1)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for r in results:
        print(r["name"], {k: v for k, v in r.items() if k not in ("name", "cli")}, file=sys.stderr)


if __name__ == "__main__":
    main()
