#!/usr/bin/env python3
"""pPXF side of the populations and dust comparison (issue 17, item 3): fit the stars with
pPXF 9.5.2 on exactly the arrays astro-fit prepared (`fit-spectrum --save-inputs`, read as
`scripts/ppxf_bench.py` reads them) with the same settings: `regul` (the REGUL keyword of the
inputs file; second order, unit steps) over the age x [M/H] grid (`reg_dim`, the templates
arranged by the SSP extension's age and [M/H] indices) and `reddening` (the REDDENAV keyword:
the start of A_V; pPXF's default curve, Calzetti et al. 2000; mdegree must then be 0).
Prints JSON: V, sigma, chi2/DOF, A_V, the light-weighted log age and [M/H] and the weights in
the inputs file's template order. Light weights are as astro-fit's `populations.rs` makes them:
weight x the template's mean over its whole prepared range; ages are averaged in log10(yr).
Reference tool only (pip install ppxf==9.5.2 astropy).

    python3 scripts/ppxf_populations.py INPUT.fits [--sigma-start 150] [--regul R]
        [--reddening AV0] [--ftol 1e-8]
"""
import argparse
import json
import os
import sys

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # one thread, like the Rust side

import numpy as np
from astropy.io import fits
from ppxf.ppxf import ppxf
import ppxf as ppxf_pkg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppxf_bench import read_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("--sigma-start", type=float, default=150.0)
    ap.add_argument("--regul", type=float, default=None,
                    help="override the inputs file's REGUL (0: none)")
    ap.add_argument("--reddening", type=float, default=None,
                    help="override the inputs file's REDDENAV (A_V start)")
    ap.add_argument("--ftol", type=float, default=1e-8)
    args = ap.parse_args()

    inputs = read_inputs(args.inputs)
    with fits.open(args.inputs) as h:
        hdr = h["TEMPLATES"].header
        regul = float(hdr.get("REGUL", 0.0)) if args.regul is None else args.regul
        reddening = hdr.get("REDDENAV") if args.reddening is None else args.reddening
        ssp = h["SSP"].data.astype(float) if "SSP" in h else None
    templates = inputs["templates"]  # (npix_temp, ntemp)
    ntemp = templates.shape[1]
    if reddening is not None:
        assert inputs["mdegree"] == 0, "pPXF fits reddening only with mdegree = 0"
        reddening = float(reddening)

    # Arrange the templates on the age x [M/H] grid: pPXF's reg_dim regularises the columns of
    # templates.reshape(npix, -1), i.e. column age_index * n_metal + metal_index.
    order = np.arange(ntemp)
    reg_dim = None
    if regul > 0:
        assert ssp is not None, "regul needs the SSP extension (astro-fit's --save-inputs)"
        ai, mi = ssp[:, 2].astype(int), ssp[:, 3].astype(int)
        na, nm = ai.max() + 1, mi.max() + 1
        assert na * nm == ntemp, "regul needs a complete age x [M/H] grid"
        order = np.empty(ntemp, dtype=int)
        order[ai * nm + mi] = np.arange(ntemp)  # grid position -> template
        reg_dim = [na, nm]
    grid_templates = templates[:, order]

    kwargs = {}
    if regul > 0:
        kwargs.update(regul=regul, reg_dim=reg_dim, reg_ord=2)
    if reddening is not None:
        kwargs.update(reddening=reddening)
    pp = ppxf(grid_templates, inputs["galaxy"][0], inputs["noise"][0], inputs["velscale"],
              [0.0, args.sigma_start], moments=inputs["moments"], degree=inputs["degree"],
              mdegree=inputs["mdegree"], lam=inputs["lam"], lam_temp=inputs["lam_temp"],
              velscale_ratio=inputs["velscale_ratio"],
              goodpixels=np.flatnonzero(inputs["good"][0]), quiet=True, ftol=args.ftol,
              **kwargs)

    weights = np.empty(ntemp)
    weights[order] = pp.weights[:ntemp]  # back to the inputs file's template order
    result = {
        "ppxf_version": ppxf_pkg.__version__,
        "regul": regul,
        "v": float(pp.sol[0]),
        "sigma": float(pp.sol[1]),
        "h": [float(x) for x in pp.sol[2:]],
        "chi2": float(pp.chi2),
        "dof": int(pp.dof),
        "reddening": None if reddening is None else float(pp.reddening),
        "weights": [float(w) for w in weights],
        "n_templates_used": int(np.sum(weights > 0)),
    }
    if ssp is not None and weights.sum() > 0:
        light = weights * templates.mean(axis=0)
        log_age = np.log10(ssp[:, 0] * 1e9)
        result["light_log_age"] = float(light @ log_age / light.sum())
        result["light_metallicity"] = float(light @ ssp[:, 1] / light.sum())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
