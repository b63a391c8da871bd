"""Robustness of Content Credentials: what survives the ways images get copied around.

For each transformation a marketplace or a user applies (JPEG re-encoding at q 90 / 75 / 50, a
resize to 50 %, a 10 % crop, a screenshot-like PNG re-save), the fraction of watermarks that
still decode to their id (as ``instabatch credentials verify`` decodes them: the pixels as they
are, then scaled back to the usual output sizes), and whether the C2PA manifest is still there
and valid. The images are the tiny model's renders and outputs from
docs/tiny-model-contact-sheet.png, scaled to the side asked for: plain product shots on flat
backdrops, the hard case for a watermark. Prints ``RESULT`` lines (docs/compliance.md's table).

    python -m bench.credentials [--side 512] [--images 24]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from core import credentials, watermark
from core.settings import REPO_ROOT

SHEET = REPO_ROOT / "docs" / "tiny-model-contact-sheet.png"
SHEET_ROWS, SHEET_COLUMNS, LABEL_WIDTH, HEADER = 12, 7, 250, 20
MANIFEST = credentials.manifest_for(title="bench", software="InstaBatch", version="bench",
                                    created={"model": "tiny-instaflow"}, refined=None, ledger={"item_id": "bench"})


def sheet_cells(side: int, count: int) -> list[Image.Image]:
    """The contact sheet's image cells (row by row), each scaled to ``side`` x ``side``."""
    sheet = Image.open(SHEET).convert("RGB")
    cell_w = (sheet.width - LABEL_WIDTH) / SHEET_COLUMNS
    cell_h = sheet.height / SHEET_ROWS
    left = sheet.width - SHEET_COLUMNS * cell_w
    cells = [sheet.crop((int(left + c * cell_w) + 2, int(r * cell_h) + HEADER, int(left + (c + 1) * cell_w) - 2,
                         int((r + 1) * cell_h) - 2))
             for r in range(SHEET_ROWS) for c in range(SHEET_COLUMNS)]
    step = max(len(cells) // count, 1)
    return [cell.resize((side, side), Image.LANCZOS) for cell in cells[::step][:count]]


def reencoded(fmt: str, **options) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format=fmt, **options)
        return buffer.getvalue()
    return apply


def transformed(change: Callable[[Image.Image], Image.Image]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        buffer = io.BytesIO()
        change(Image.open(io.BytesIO(data)).convert("RGB")).save(buffer, format="PNG")
        return buffer.getvalue()
    return apply


def crop_centre(picture: Image.Image) -> Image.Image:
    margin_x, margin_y = round(picture.width * 0.05), round(picture.height * 0.05)
    return picture.crop((margin_x, margin_y, picture.width - margin_x, picture.height - margin_y))


def crop_corner(picture: Image.Image) -> Image.Image:
    return picture.crop((0, 0, round(picture.width * 0.9), round(picture.height * 0.9)))


ATTACKS: dict[str, Callable[[bytes], bytes]] = {
    "original": lambda data: data,
    "jpeg_q90": reencoded("JPEG", quality=90),
    "jpeg_q75": reencoded("JPEG", quality=75),
    "jpeg_q50": reencoded("JPEG", quality=50),
    "resize_50": transformed(lambda p: p.resize((p.width // 2, p.height // 2), Image.LANCZOS)),
    "crop_10_centre": transformed(crop_centre),
    "crop_10_corner": transformed(crop_corner),
    "png_resave": reencoded("PNG"),
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp()) / "credentials"
    credentials.create_dev_chain(folder)
    identity = credentials.identity_from(str(folder / credentials.KEY_FILE), str(folder / credentials.CHAIN_FILE),
                                         source="bench")
    decoded = {name: 0 for name in ATTACKS}
    as_is = {name: 0 for name in ATTACKS}
    manifests = {name: 0 for name in ATTACKS}
    seconds = {"embed": 0.0, "sign": 0.0}
    qualities, extra_bytes = [], []
    pictures = sheet_cells(args.side, args.images)
    for number, picture in enumerate(pictures):
        mark_id = watermark.watermark_id("bench", number)
        began = time.perf_counter()
        marked, mark = watermark.embed(picture, mark_id)
        seconds["embed"] += time.perf_counter() - began
        if not mark.embedded:
            raise SystemExit(f"{mark.reason}: pick --side {watermark.MIN_SIDE} or more")
        qualities.append(psnr(picture, marked))
        buffer = io.BytesIO()
        marked.save(buffer, format="PNG")
        began = time.perf_counter()
        signed = credentials.sign(buffer.getvalue(), "image/png", MANIFEST, identity)
        seconds["sign"] += time.perf_counter() - began
        extra_bytes.append(len(signed) - len(buffer.getvalue()))
        for name, attack in ATTACKS.items():
            copy = attack(signed)
            copied = Image.open(io.BytesIO(copy)).convert("RGB")
            as_is[name] += watermark.decode(copied) == mark_id
            decoded[name] += any(found == mark_id for found, _ in watermark.candidates(copied))
            manifests[name] += credentials.read_manifest(copy).valid

    count = len(pictures)
    print(f"RESULT credentials_images={count} side={args.side} watermark_bits={watermark.BITS} "
          f"method={watermark.METHOD} psnr_db_mean={np.mean(qualities):.1f} psnr_db_min={np.min(qualities):.1f} "
          f"embed_ms={seconds['embed'] / count * 1000:.0f} sign_ms={seconds['sign'] / count * 1000:.1f} "
          f"manifest_bytes={int(np.mean(extra_bytes))}")
    for name in ATTACKS:
        print(f"RESULT credentials_{name} watermark_decoded={decoded[name] / count:.3f} "
              f"watermark_decoded_as_is={as_is[name] / count:.3f} manifest_kept={manifests[name] / count:.3f}")


if __name__ == "__main__":
    main()
