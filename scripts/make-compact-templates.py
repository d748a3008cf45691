#!/usr/bin/env python3
"""Make apps/astro-fit/data/emiles-compact.tar.gz: the compact default template library that
ships in the repo, so that the control plane's main job needs nothing outside it.

A one-off generator (pip install astropy); CI never runs it. It takes 30 E-MILES SSPs (10 ages
from 63 Myr to 15.8 Gyr, log-spaced, x [M/H] -1.31, -0.40, +0.22; Kroupa-like unimodal IMF
slope 1.30, baseFe), crops each to 3300-7700 A (enough for astro-fit's default 3600-7400 A fit
range plus the velocity margin and the resolution-matching kernel), writes them as float32 with
CRVAL1/CDELT1/CRPIX1 describing the cropped axis, and keeps the MILES copyright header
unchanged (its terms ask for that). The Vazdekis mass table comes along, reduced to the rows of
these SSPs, because astro-fit reads masses from it for mass-weighted populations.

The archive is flat (no directories) and deterministic (fixed mtimes, sorted names, no gzip
timestamp), so rerunning it gives the same bytes.

    python3 scripts/make-compact-templates.py \
        --emiles ../shared/data/templates/emiles \
        --out apps/astro-fit/data/emiles-compact.tar.gz
"""
import argparse
import gzip
import io
import os
import re
import sys
import tarfile

import numpy as np
from astropy.io import fits

AGES = ["00.0631", "00.1259", "00.2512", "00.5012", "01.0000", "01.9953", "03.9811",
        "06.3096", "10.0000", "15.8489"]
METALS = ["m1.31", "m0.40", "p0.22"]
SLOPE = "1.30"
LAM_RANGE = (3300.0, 7700.0)
MASS_PREFIX = "Vazdekis2012_ssp_mass_"


def template_name(metal, age):
    return f"Eun{SLOPE}Z{metal}T{age}_iPp0.00_baseFe_linear_FWHM_variable.fits"


def cropped_fits(path):
    """The template cropped to LAM_RANGE, as FITS bytes (float32, same header otherwise)."""
    with fits.open(path) as h:
        hdr = h[0].header.copy()
        flux = h[0].data
        crval, cdelt = hdr["CRVAL1"], hdr["CDELT1"]
        crpix = hdr.get("CRPIX1", 1.0)
        lam = crval + (np.arange(flux.size) + 1.0 - crpix) * cdelt
        keep = np.flatnonzero((lam >= LAM_RANGE[0]) & (lam <= LAM_RANGE[1]))
        lo, hi = keep[0], keep[-1] + 1
        hdu = fits.PrimaryHDU(np.asarray(flux[lo:hi], dtype=np.float32), header=hdr)
        hdu.header["CRVAL1"] = float(lam[lo])
        hdu.header["CDELT1"] = float(cdelt)
        hdu.header["CRPIX1"] = 1.0
        hdu.header.add_history(
            f"ceccm: cropped to {lam[lo]:.1f}-{lam[hi - 1]:.1f} A, float32 "
            "(scripts/make-compact-templates.py)")
        buf = io.BytesIO()
        hdu.writeto(buf, output_verify="exception")
        return buf.getvalue()


def reduced_mass_table(path, wanted):
    """Comment lines plus the rows of the (slope, [M/H], age) triples in `wanted`."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if line.startswith("#") or len(fields) < 6:
                out.append(line)
                continue
            key = (float(fields[1]), round(float(fields[2]), 2), float(fields[3]))
            if any(abs(key[0] - s) < 1e-3 and abs(key[1] - m) < 0.02
                   and abs(np.log(key[2] / a)) < 0.01 for s, m, a in wanted):
                out.append(line)
    return "".join(out).encode()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--emiles", required=True, help="the full E-MILES directory (pPXF's)")
    ap.add_argument("--out", required=True, help="the .tar.gz to write")
    a = ap.parse_args()

    files = []
    wanted = []
    for metal in METALS:
        for age in AGES:
            name = template_name(metal, age)
            files.append((name, cropped_fits(os.path.join(a.emiles, name))))
            sign = -1.0 if metal[0] == "m" else 1.0
            wanted.append((float(SLOPE), sign * float(metal[1:]), float(age)))
    masses = [n for n in os.listdir(a.emiles) if n.startswith(MASS_PREFIX)]
    if len(masses) != 1:
        sys.exit(f"expected one {MASS_PREFIX}* table in {a.emiles}, found {masses}")
    table = reduced_mass_table(os.path.join(a.emiles, masses[0]), wanted)
    rows = sum(1 for l in table.decode().splitlines() if l and not l.startswith("#"))
    if rows != len(wanted):
        sys.exit(f"mass table: {rows} rows for {len(wanted)} templates")
    files.append((masses[0], table))

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files):
            add(tar, name, data)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "wb") as f:
        # mtime=0 and no file name in the gzip header: the same inputs give the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(raw.getvalue())
    print(f"wrote {a.out}: {len(files) - 1} templates + {masses[0]} "
          f"({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
    main()
