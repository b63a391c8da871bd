"""The invisible watermark: a short id in the pixels that survives re-encoding and metadata stripping.

``invisible-watermark`` (``imwatermark``, the library diffusers' SDXL pipelines use) spreads the
bits over the DWT-DCT-SVD coefficients of the U channel, repeated across the whole image, so a
JPEG re-encode or a resize keeps them where a C2PA manifest is dropped. The id is 32 bits derived
from what decides the pixels (model, prompt, seed, params): the same generation gets the same
watermark, so the same prompt, seed and params still give the same pixels, and the id maps back to
the image rows through ``images.watermark_id`` (docs/compliance.md, "Content Credentials").

Measured (bench/credentials.py, docs/compliance.md): below 256 x 256 the library refuses to embed,
and from 256 px up the id decodes after JPEG q75; smaller images are skipped and the skip recorded.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

METHOD = "dwtDctSvd"
BITS = 32
# Strength per YUV channel (Y, U, V). 60 on U: PSNR ≈ 37 dB, bit-exact after JPEG q50 at 512 px;
# the library's default 36 lost most ids at q75 (bench/credentials.py).
SCALES = (0, 60, 0)
MIN_SIDE = 256  # imwatermark refuses images under 256 x 256 pixels
# Sizes a resized copy is scaled back to before a second decode: the DWT blocks must line up again.
RESYNC_SIDES = (512, 768, 1024, 256, 384, 640, 896)


@dataclass(frozen=True)
class Mark:
    """What happened to one image: the id embedded, or why not (recorded, never silent)."""

    id: str
    embedded: bool
    reason: str | None = None

    def as_record(self) -> dict[str, object]:
        record: dict[str, object] = {"id": self.id, "method": METHOD, "bits": BITS, "embedded": self.embedded}
        if self.reason:
            record["skipped"] = self.reason
        return record


def watermark_id(*parts: object) -> str:
    """32 bits (8 hex digits) of the sha256 of what decides the pixels."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[: BITS // 4]


def too_small(width: int, height: int) -> str | None:
    if min(width, height) >= MIN_SIDE:
        return None
    return f"image {width}x{height} is under the watermark's minimum {MIN_SIDE}x{MIN_SIDE}"


def embed(picture: Image.Image, mark_id: str) -> tuple[Image.Image, Mark]:
    """The watermarked picture, or the picture unchanged with the reason it was skipped."""
    reason = too_small(picture.width, picture.height)
    if reason:
        return picture, Mark(mark_id, embedded=False, reason=reason)
    from imwatermark import WatermarkEncoder  # imports cv2: only where a watermark is made

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", _bits(mark_id))
    bgr = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[:, :, ::-1])
    marked = encoder.encode(bgr, METHOD, scales=list(SCALES))
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1])), Mark(mark_id, embedded=True)


def decode(picture: Image.Image) -> str | None:
    """The id the pixels carry as they are, or None when too small to hold one."""
    if too_small(picture.width, picture.height):
        return None
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[:, :, ::-1])
    bits = WatermarkDecoder("bits", BITS).decode(bgr, METHOD, scales=list(SCALES))
    return _hex(bits)


def candidates(picture: Image.Image) -> Iterable[str]:
    """Ids to look up: the pixels as they are, then scaled back to each usual output size (a
    resized copy decodes once its blocks line up again). Only the ledger can tell which is real."""
    seen: set[str] = set()
    for variant in _variants(picture):
        found = decode(variant)
        if found is not None and found not in seen:
            seen.add(found)
            yield found


def _variants(picture: Image.Image) -> Iterable[Image.Image]:
    yield picture
    longest = max(picture.size)
    for side in RESYNC_SIDES:
        if side != longest:
            scale = side / longest
            yield picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)


def _bits(mark_id: str) -> list[int]:
    value = int(mark_id, 16)
    return [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)]


def _hex(bits: Iterable[object]) -> str:
    value = 0
    for bit in bits:
        value = (value << 1) | int(bool(bit))
    return f"{value:0{BITS // 4}x}"
