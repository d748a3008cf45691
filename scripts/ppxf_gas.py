#!/usr/bin/env python3
"""pPXF side of the gas comparison (issue 17): fit stars and gas emission lines with pPXF 9.5.2
on exactly the arrays astro-fit prepared (`fit-spectrum --save-inputs`, read as
`scripts/ppxf_bench.py` reads them), with pPXF's own gas templates: `ppxf_util.emission_lines`
(tie_balmer=False, limit_doublets=False, vacuum wavelengths) on the templates' grid with the
spectrum's instrumental FWHM (the FWHM row of the inputs file). Kinematic components as in
pPXF's examples: stars 0, Balmer (names without '[') 1, forbidden 2; or, with --tied, all gas
in component 1. Prints JSON. Reference tool only (pip install ppxf==9.5.2 astropy).

    python3 scripts/ppxf_gas.py INPUT.fits --lines Hbeta,Halpha,[OIII]5007_d [--tied]
        [--sigma-start 150] [--gas-sigma-start 50] [--air] [--time]
"""
import argparse
import contextlib
import json
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # one thread, like the Rust side

import numpy as np
from astropy.io import fits
from ppxf.ppxf import ppxf
import ppxf as ppxf_pkg
import ppxf.ppxf_util as util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppxf_bench import read_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("--lines", required=True, help="comma-separated gas template names")
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--sigma-start", type=float, default=150.0)
    ap.add_argument("--gas-sigma-start", type=float, default=50.0)
    ap.add_argument("--air", action="store_true", help="the spectrum's medium is air")
    ap.add_argument("--repeat", type=int, default=1, help="fit this many times (timing)")
    ap.add_argument("--ftol", type=float, default=1e-8)
    args = ap.parse_args()

    inputs = read_inputs(args.inputs)
    with fits.open(args.inputs) as h:
        fwhm = h["FWHM"].data.astype(float)[0]
        flux_scale = float(h["TEMPLATES"].header["FLUXSCL"])
    lam = inputs["lam"]
    stars = inputs["templates"]
    ln_lam_temp = np.log(inputs["lam_temp"])
    lam_range_gal = [lam[0], lam[-1]]

    def fwhm_gal(w):
        return np.interp(w, lam, fwhm)

    with contextlib.redirect_stdout(sys.stderr):  # it prints the lines it includes
        gas_templates, gas_names, _ = util.emission_lines(
            ln_lam_temp, lam_range_gal, fwhm_gal, tie_balmer=False, limit_doublets=False,
            vacuum=not args.air)
    wanted = args.lines.split(",")
    keep = [list(gas_names).index(n) for n in wanted]
    gas_templates = gas_templates[:, keep]
    gas_names = np.asarray(gas_names)[keep]
    forbidden = np.array(["[" in n for n in gas_names])
    n_stars = stars.shape[1]
    if args.tied:
        gas_comp = np.ones(len(gas_names), dtype=int)
        n_gas_comp = 1
    else:
        # Components numbered as they appear: Balmer first when present, then forbidden.
        kinds = [k for k in (False, True) if np.any(forbidden == k)]
        gas_comp = np.array([1 + kinds.index(f) for f in forbidden])
        n_gas_comp = len(kinds)
    component = np.concatenate([np.zeros(n_stars, dtype=int), gas_comp])
    templates = np.column_stack([stars, gas_templates])
    moments = [inputs["moments"]] + [2] * n_gas_comp
    start = [[0.0, args.sigma_start]] + [[0.0, args.gas_sigma_start]] * n_gas_comp

    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.repeat):
        pp = ppxf(templates, inputs["galaxy"][0], inputs["noise"][0], inputs["velscale"],
                  start, moments=moments, degree=inputs["degree"], mdegree=inputs["mdegree"],
                  lam=lam, lam_temp=inputs["lam_temp"],
                  velscale_ratio=inputs["velscale_ratio"],
                  goodpixels=np.flatnonzero(inputs["good"][0]), component=component,
                  gas_component=component > 0, gas_names=gas_names, quiet=True,
                  ftol=args.ftol)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({
        "ppxf_version": ppxf_pkg.__version__,
        "cpu_s_per_fit": cpu / args.repeat,
        "wall_s_per_fit": wall / args.repeat,
        "stars": {"v": float(pp.sol[0][0]), "sigma": float(pp.sol[0][1])},
        "components": [
            {"v": float(pp.sol[c][0]), "sigma": float(pp.sol[c][1]),
             "v_error": float(pp.error[c][0]), "sigma_error": float(pp.error[c][1])}
            for c in range(1, 1 + n_gas_comp)],
        "lines": [
            {"name": str(n), "flux": float(f) * flux_scale, "flux_error": float(e) * flux_scale}
            for n, f, e in zip(gas_names, pp.gas_flux, pp.gas_flux_error)],
        "chi2": float(pp.chi2),
        "dof": int(pp.dof),
    }))


if __name__ == "__main__":
    main()
