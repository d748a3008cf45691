#!/usr/bin/env python3
"""pPXF side of `bench-fit`: read the templates and spectra astro-fit prepared (a FITS file
written by the benchmark), fit each spectrum with pPXF at the same settings, print JSON with
the CPU and wall time and the fitted V, sigma. Reference tool only (pip install ppxf astropy).

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


def main():
    with fits.open(sys.argv[1]) as h:
        hdr = h["TEMPLATES"].header
        templates = h["TEMPLATES"].data.astype(float).T  # (npix_temp, ntemp)
        galaxy = h["GALAXY"].data.astype(float)
        noise = h["NOISE"].data.astype(float)
        good = h["GOOD"].data.astype(bool)
        velscale = hdr["VELSCALE"]
        ratio = int(hdr["VSRATIO"])
        degree = int(hdr["DEGREE"])
        moments = int(hdr["MOMENTS"])
        lam_temp = np.exp(hdr["LNLAMT0"] + np.arange(templates.shape[0]) * velscale / ratio / 299792.458)
        lam = np.exp(hdr["LNLAMG0"] + np.arange(galaxy.shape[1]) * velscale / 299792.458)
    results = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for g, n, m in zip(galaxy, noise, good):
        pp = ppxf(templates, g, n, velscale, [0.0, 150.0], moments=moments, degree=degree,
                  mdegree=0, lam=lam, lam_temp=lam_temp, velscale_ratio=ratio,
                  goodpixels=np.flatnonzero(m), quiet=True)
        results.append([float(pp.sol[0]), float(pp.sol[1])])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    import ppxf as ppxf_pkg
    print(json.dumps({"ppxf_version": ppxf_pkg.__version__, "cpu_s": cpu, "wall_s": wall,
                      "results": results}))


if __name__ == "__main__":
    main()
