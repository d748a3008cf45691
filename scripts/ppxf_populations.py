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
        [--reddening AV0] [--ftol 1e-8] [--penalised]
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


def laplacian_rows(reg_dim, regul):
    """pPXF's `regularization` rows (reg_ord=2, unit steps) as a matrix on the flattened grid:
    one row per grid point, regul x (the sum over dimensions, where the point is interior, of
    w[j-1] - 2 w[j] + w[j+1])."""
    na, nm = reg_dim
    rows = np.zeros((na * nm, na * nm))
    for a in range(na):
        for m in range(nm):
            r = a * nm + m
            if 0 < a < na - 1:
                rows[r, [(a - 1) * nm + m, r, (a + 1) * nm + m]] += [regul, -2 * regul, regul]
            if 0 < m < nm - 1:
                rows[r, [r - 1, r, r + 1]] += [regul, -2 * regul, regul]
    return rows


def penalised_ppxf(rows):
    """pPXF whose non-linear search minimises the pixel chi2 plus the regularisation penalty
    ||rows @ w||^2 (the penalty rows appended to its residuals), as astro-fit does; pPXF
    itself adds the rows to the linear solve only, and its search sees the pixels alone."""

    class Penalised(ppxf):
        def linear_fit(self, pars):
            err = super().linear_fit(pars)
            if not self.fit:
                return err
            npoly = (self.degree + 1) * self.nspec
            w = self.weights[npoly:npoly + rows.shape[0]]
            return np.append(err, rows @ w)

    return Penalised


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("--sigma-start", type=float, default=150.0)
    ap.add_argument("--regul", type=float, default=None,
                    help="override the inputs file's REGUL (0: none)")
    ap.add_argument("--reddening", type=float, default=None,
                    help="override the inputs file's REDDENAV (A_V start)")
    ap.add_argument("--ftol", type=float, default=1e-8)
    ap.add_argument("--penalised", action="store_true",
                    help="minimise chi2 + regularisation penalty over the non-linear "
                         "parameters too (astro-fit's objective), not the pixel chi2 alone")
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
    cls = ppxf
    if args.penalised and regul > 0:
        cls = penalised_ppxf(laplacian_rows(reg_dim, regul))
    pp = cls(grid_templates, inputs["galaxy"][0], inputs["noise"][0], inputs["velscale"],
              [0.0, args.sigma_start], moments=inputs["moments"], degree=inputs["degree"],
              mdegree=inputs["mdegree"], lam=inputs["lam"], lam_temp=inputs["lam_temp"],
              velscale_ratio=inputs["velscale_ratio"],
              goodpixels=np.flatnonzero(inputs["good"][0]), quiet=True, ftol=args.ftol,
              **kwargs)

    # chi2/DOF of the pixels alone (the penalised variant's final residuals include the penalty).
    chi2, dof = float(pp.chi2), int(pp.dof)
    if cls is not ppxf:
        resid = ((inputs["galaxy"][0] - pp.bestfit) / inputs["noise"][0])[pp.goodpixels]
        dof -= ntemp  # the penalty rows
        chi2 = float(resid @ resid) / dof
    weights = np.empty(ntemp)
    weights[order] = pp.weights[:ntemp]  # back to the inputs file's template order
    result = {
        "ppxf_version": ppxf_pkg.__version__,
        "regul": regul,
        "v": float(pp.sol[0]),
        "sigma": float(pp.sol[1]),
        "h": [float(x) for x in pp.sol[2:]],
        "chi2": chi2,
        "dof": dof,
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
