#!/usr/bin/env python3
"""pPXF side of `bench-fit`: read the templates and spectra astro-fit prepared (a FITS file
written by `astro_fit::ppxf_inputs`), fit each spectrum with pPXF at the same settings, print
JSON with the CPU and wall time and the fitted V, sigma. Reference tool only (pip install
ppxf astropy).

    python3 scripts/ppxf_bench.py INPUT.fits
"""
import json
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # one thread, like the Rust side

import numpy as np
from astropy.io import fits
from ppxf.ppxf import ppxf

C = 299792.458


def read_inputs(path):
    """The arrays and settings of an `astro_fit::ppxf_inputs` file."""
    with fits.open(path) as h:
        hdr = h["TEMPLATES"].header
        velscale, ratio = hdr["VELSCALE"], int(hdr["VSRATIO"])
        templates = h["TEMPLATES"].data.astype(float).T  # (npix_temp, ntemp)
        galaxy = h["GALAXY"].data.astype(float)
        return {
            "templates": templates,
            "galaxy": galaxy,
            "noise": h["NOISE"].data.astype(float),
            "good": h["GOOD"].data.astype(bool),
            "velscale": velscale,
            "velscale_ratio": ratio,
            "degree": int(hdr["DEGREE"]),
            "mdegree": int(hdr.get("MDEGREE", 0)),
            "moments": int(hdr["MOMENTS"]),
            "lam_temp": np.exp(hdr["LNLAMT0"] + np.arange(templates.shape[0]) * velscale / ratio / C),
            "lam": np.exp(hdr["LNLAMG0"] + np.arange(galaxy.shape[1]) * velscale / C),
        }


def fit_one(inputs, i, start=(0.0, 150.0), **kwargs):
    """pPXF on spectrum `i` of `inputs`; extra keyword arguments go to ppxf (e.g. ftol)."""
    return ppxf(inputs["templates"], inputs["galaxy"][i], inputs["noise"][i], inputs["velscale"],
                list(start), moments=inputs["moments"], degree=inputs["degree"],
                mdegree=inputs["mdegree"], lam=inputs["lam"], lam_temp=inputs["lam_temp"],
                velscale_ratio=inputs["velscale_ratio"],
                goodpixels=np.flatnonzero(inputs["good"][i]), quiet=True, **kwargs)


def main():
    inputs = read_inputs(sys.argv[1])
    results = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(inputs["galaxy"].shape[0]):
        pp = fit_one(inputs, i)
        results.append([float(pp.sol[0]), float(pp.sol[1])])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    import ppxf as ppxf_pkg
    print(json.dumps({"ppxf_version": ppxf_pkg.__version__, "cpu_s": cpu, "wall_s": wall,
                      "results": results}))


if __name__ == "__main__":
    main()
