#!/usr/bin/env python3
"""Writes the tiny FITS seeds of the fits_cube fuzz target (standard library only).

Each seed is a valid cube of one format astro-fit reads (MEGARA, MUSE, MaNGA), a few spaxels
and planes, so that the fuzzer starts from inputs that reach the layout and WCS code rather
than stopping at the first header. Run from the repository root:
    python3 fuzz/make_seeds.py fuzz/corpus/fits_cube
"""

import struct
import sys
from pathlib import Path

RECORD = 2880


def card(key, value=None, comment=""):
    if key == "END":
        return "END".ljust(80)
    if isinstance(value, bool):
        v = "T" if value else "F"
        v = v.rjust(20)
    elif isinstance(value, (int, float)):
        v = repr(value).rjust(20)
    else:
        v = ("'" + str(value).ljust(8) + "'").ljust(20)
    text = f"{key:<8}= {v}"
    if comment:
        text += " / " + comment
    return text[:80].ljust(80)


def pad(data, fill):
    n = (-len(data)) % RECORD
    return data + fill * n


def hdu(cards, data=b"", primary=False):
    head = "".join(cards + [card("END")]).encode("ascii")
    return pad(head, b" ") + pad(data, b"\0")


def image(shape, extname=None, primary=False, extra=(), bitpix=-32):
    """Cards of an image HDU; shape in FITS order (NAXIS1 first)."""
    cards = [card("SIMPLE", True)] if primary else [card("XTENSION", "IMAGE")]
    cards += [card("BITPIX", bitpix), card("NAXIS", len(shape))]
    cards += [card(f"NAXIS{i + 1}", n) for i, n in enumerate(shape)]
    if primary:
        cards.append(card("EXTEND", True))
    else:
        cards += [card("PCOUNT", 0), card("GCOUNT", 1)]
    if extname:
        cards.append(card("EXTNAME", extname))
    cards += list(extra)
    return cards


def floats(values, fmt=">f"):
    return b"".join(struct.pack(fmt, v) for v in values)


def megara(nx=3, ny=2, nw=4):
    wcs = [
        card("INSTRUME", "MEGARA"),
        card("CTYPE3", "AWAV"),
        card("CUNIT3", "Angstrom"),
        card("CRVAL3", 6000.0),
        card("CRPIX3", 1.0),
        card("CDELT3", 0.5),
        card("CDELT1", -1.5e-4),
        card("CDELT2", 1.5e-4),
    ]
    n = nx * ny * nw
    flux = floats([float(i % 7) for i in range(n)])
    var = floats([4.0] * n)
    return hdu(image([nx, ny, nw], primary=True, extra=wcs), flux) + hdu(
        image([nx, ny, nw], "VARIANCE"), var
    )


def muse(nx=2, ny=2, nw=5):
    primary = hdu(image([], primary=True, extra=[card("INSTRUME", "MUSE"), card("Z", 0.01)]))
    wcs = [
        card("CTYPE3", "AWAV"),
        card("CUNIT3", "Angstrom"),
        card("CRVAL3", 4750.0),
        card("CRPIX3", 1.0),
        card("CD3_3", 1.25),
        card("CD1_1", -5.5555e-5),
        card("CD2_2", 5.5555e-5),
        card("CTYPE1", "RA---TAN"),
        card("CTYPE2", "DEC--TAN"),
        card("CRVAL1", 10.0),
        card("CRVAL2", -5.0),
    ]
    n = nx * ny * nw
    data = hdu(image([nx, ny, nw], "DATA", extra=wcs), floats([1.0 + i for i in range(n)]))
    stat = hdu(image([nx, ny, nw], "STAT", extra=wcs), floats([0.5] * n))
    return primary + data + stat


def manga(nx=2, ny=2, nw=4):
    primary = hdu(image([], primary=True, extra=[card("INSTRUME", "MaNGA"), card("Z", 0.018)]))
    wcs = [
        card("CTYPE3", "WAVE-LOG"),
        card("CUNIT3", "Angstrom"),
        card("CRVAL3", 3621.6),
        card("CRPIX3", 1.0),
        card("CD3_3", 0.8),
        card("CD1_1", -1.389e-4),
        card("CD2_2", 1.389e-4),
    ]
    n = nx * ny * nw
    out = primary
    out += hdu(image([nx, ny, nw], "FLUX", extra=wcs), floats([1.0] * n))
    out += hdu(image([nx, ny, nw], "IVAR", extra=wcs), floats([4.0] * n))
    out += hdu(image([nx, ny, nw], "MASK", extra=wcs, bitpix=32), b"".join(
        struct.pack(">i", 0) for _ in range(n)))
    wave = [3621.6 * 10 ** (1e-4 * k) for k in range(nw)]
    out += hdu(image([nw], "WAVE", bitpix=-64), floats(wave, ">d"))
    out += hdu(image([nw], "SPECRES", bitpix=-64), floats([2000.0] * nw, ">d"))
    return out


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/fits_cube")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in [("megara.fits", megara()), ("muse.fits", muse()), ("manga.fits", manga())]:
        (out / name).write_bytes(data)
        print(out / name, len(data))


if __name__ == "__main__":
    main()
