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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

METHOD = "dwtDctSvd"
BITS = 32
# Strength per YUV channel (Y, U, V). 60 on U: PSNR ≈ 37 dB, bit-exact after JPEG q50 at 512 px;
# the library's default 36 lost most ids at q75 (bench/credentials.py).
SCALES = (0, 60, 0)
MIN_SIDE = 256  # imwatermark refuses images under 256 x 256 pixels
BLOCK = 4  # imwatermark's block side in the DWT approximation (8 px of the image)
READ_MIN_SIDE = MIN_SIDE // 2  # a copy cut or shrunk below MIN_SIDE can still be read (rescaled, realigned)
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


def readable(width: int, height: int) -> bool:
    return min(width, height) >= READ_MIN_SIDE


def embed(picture: Image.Image, mark_id: str) -> tuple[Image.Image, Mark]:
    """The watermarked picture, or the picture unchanged with the reason it was skipped."""
    reason = too_small(picture.width, picture.height)
    if reason:
        return picture, Mark(mark_id, embedded=False, reason=reason)
    bgr = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[:, :, ::-1])
    marked = _embed_blocks(bgr, _bits(mark_id))
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1])), Mark(mark_id, embedded=True)


def _embed_blocks(bgr: np.ndarray, bits: list[int]) -> np.ndarray:
    """imwatermark's ``EmbedDwtDctSvd.encode`` (scales ``SCALES``) over every 4 x 4 block at once
    instead of one Python iteration per block: under 4 ms instead of 110 per 512² image on this machine
    (docs/performance.md). Per block the library takes the DCT, re-quantises the largest singular
    value to carry the bit, and inverts; the DCT is orthonormal, so the singular values and the
    rebuilt block are the same without it (as ``_block_scores`` reads them). Only the largest
    singular value changes, so the block changes by (new - old) times its top singular pair's outer
    product (``_top_singular``), which needs no full SVD. Same bytes as the library's: the floats
    differ from LAPACK's rebuild by about 1e-13, far inside a pixel's rounding (tests/test_credentials.py
    compares them)."""
    import cv2  # only where a watermark is made

    rows, columns = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    for channel, scale in enumerate(SCALES[:2]):  # the library's loop: Y and U only
        if scale <= 0:
            continue
        approximation, (horizontal, vertical, diagonal) = haar_dwt2(yuv[:rows, :columns, channel])
        block_rows, block_columns = approximation.shape[0] // BLOCK, approximation.shape[1] // BLOCK
        area = approximation[: block_rows * BLOCK, : block_columns * BLOCK]
        blocks = area.reshape(block_rows, BLOCK, block_columns, BLOCK).swapaxes(1, 2).reshape(-1, BLOCK, BLOCK)
        left, largest, right = _top_singular(blocks)
        carried = np.asarray(bits, dtype=np.float64)[np.arange(len(blocks)) % len(bits)]  # row-major blocks
        requantised = (largest // scale + 0.25 + 0.5 * carried) * scale
        rebuilt = blocks + (requantised - largest)[:, None, None] * (left[:, :, None] * right[:, None, :])
        area[...] = rebuilt.reshape(block_rows, block_columns, BLOCK, BLOCK).swapaxes(1, 2).reshape(area.shape)
        # The library passes the details back as (v, h, d): swapped, and kept so for the same bytes.
        yuv[:rows, :columns, channel] = haar_idwt2(approximation, (vertical, horizontal, diagonal))
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)


def _top_singular(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest singular value of each 4 x 4 block and its left and right vectors, for thousands of
    blocks at once (2 ms for 4,096 where ``np.linalg.svd`` takes 10): the Gram matrix BᵀB squared six
    times (its 64th power: the top eigenvector dominates any other by (s1/s0)^128), its strongest
    column refined by two power steps, then u = Bv / |Bv|. An all-zero block gets e1, e1, as LAPACK
    gives it. Blocks are laid out as (4, 4, n) so each product is a vectorised einsum."""
    matrices = np.ascontiguousarray(np.moveaxis(blocks, 0, -1))
    gram = np.einsum("kin,kjn->ijn", matrices, matrices)
    power = gram
    for _ in range(6):
        power = np.einsum("ikn,kjn->ijn", power, power)
        power = power / np.maximum(np.abs(power).max(axis=(0, 1)), np.finfo(np.float64).tiny)
    strongest = np.argmax(np.einsum("ijn,ijn->jn", power, power), axis=0)
    right = np.take_along_axis(power, strongest[None, None, :], axis=1)[:, 0, :]
    for _ in range(2):
        right = np.einsum("ijn,jn->in", gram, right)
        right = right / np.maximum(np.sqrt(np.einsum("in,in->n", right, right)), np.finfo(np.float64).tiny)
    image = np.einsum("ijn,jn->in", matrices, right)
    largest = np.sqrt(np.einsum("in,in->n", image, image))
    left = image / np.maximum(largest, np.finfo(np.float64).tiny)
    zero = largest == 0
    left[:, zero], right[:, zero] = 0.0, 0.0
    left[0, zero], right[0, zero] = 1.0, 1.0
    return left.T, largest, right.T


# The Haar wavelet of PyWavelets (pywt.Wavelet("haar")): every coefficient is 1/sqrt(2).
_HAAR = np.float64(0.7071067811865476)


def haar_dwt2(image: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``pywt.dwt2(image, "haar")`` of an array with even sides, bit for bit (the same two products
    summed per coefficient, axis 0 then axis 1), in NumPy: 0.8 ms instead of 5 at 512²
    (tests/test_credentials.py compares them)."""
    low, high = _haar_split(image.astype(np.float64), 0)
    approximation, vertical = _haar_split(low, 1)
    horizontal, diagonal = _haar_split(high, 1)
    return approximation, (horizontal, vertical, diagonal)


def haar_idwt2(approximation: np.ndarray, details: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """``pywt.idwt2((approximation, details), "haar")``, bit for bit (axis 1 then axis 0, as PyWavelets)."""
    horizontal, vertical, diagonal = details
    return _haar_merge(_haar_merge(approximation, vertical, 1), _haar_merge(horizontal, diagonal, 1), 0)


def _haar_split(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.moveaxis(values, axis, 0)
    even, odd = values[0::2], values[1::2]
    return np.moveaxis(_HAAR * even + _HAAR * odd, 0, axis), np.moveaxis(_HAAR * even - _HAAR * odd, 0, axis)


def _haar_merge(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    low, high = np.moveaxis(low, axis, 0), np.moveaxis(high, axis, 0)
    merged = np.empty((2 * low.shape[0],) + low.shape[1:])
    merged[0::2] = _HAAR * low + _HAAR * high
    merged[1::2] = _HAAR * low - _HAAR * high
    return np.moveaxis(merged, 0, axis)


def decode(picture: Image.Image) -> str | None:
    """The id the pixels carry as they are, or None when too small to hold one."""
    if too_small(picture.width, picture.height):
        return None
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[:, :, ::-1])
    bits = WatermarkDecoder("bits", BITS).decode(bgr, METHOD, scales=list(SCALES))
    return _hex(bits)


def candidates(picture: Image.Image) -> Iterator[tuple[str, str]]:
    """(id, how it was read) to look up, lazily and clearest first: the pixels ``as_is``, then
    ``rescaled`` to each usual output size (a resized copy decodes once its blocks line up
    again), then ``realigned`` for a cropped copy (64 ids: a lead, not proof). Only the ledger
    can tell which is real."""
    seen: set[str] = set()
    for found, how in _readings(picture):
        if found is not None and found not in seen:
            seen.add(found)
            yield found, how


def _readings(picture: Image.Image) -> Iterator[tuple[str | None, str]]:
    for number, variant in enumerate(_variants(picture)):
        yield decode(variant), "as_is" if number == 0 else "rescaled"
    for found in _cropped(picture):
        yield found, "realigned"


def _variants(picture: Image.Image) -> Iterable[Image.Image]:
    yield picture
    longest = max(picture.size)
    for side in RESYNC_SIDES:
        if side != longest:
            scale = side / longest
            yield picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)


def _cropped(picture: Image.Image, keep: int = 2) -> list[str]:
    """A crop moves the block grid and changes how many blocks a row has, so imwatermark's own
    decode reads the bits out of order. This scores every block once per pixel offset (the grid
    repeats every 8 px) and votes under each block-row length of the usual output sizes. Where
    the sequence of bits starts is lost with the cropped rows and columns, and every start votes
    equally clearly, so each of the ``keep`` clearest alignments gives its 32 rotations (no
    rotation first: a crop that kept the top-left corner)."""
    if not readable(picture.width, picture.height):
        return []
    bgr = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[:, :, ::-1])
    row_lengths = sorted({side // (2 * BLOCK) for side in (*RESYNC_SIDES, picture.width)})
    clarity: dict[int, float] = {}  # by the id's smallest rotation: how clearly the blocks voted
    found: dict[int, int] = {}  # by the same key: the id as read at the clearest alignment
    for dy in range(2 * BLOCK):
        for dx in range(2 * BLOCK):
            scores = _block_scores(bgr[dy:, dx:])
            rows, columns = np.indices(scores.shape)
            for row_length in row_lengths:
                bit = ((rows * row_length + columns) % BITS).ravel()
                counts = np.bincount(bit, minlength=BITS)
                votes = np.divide(np.bincount(bit, weights=scores.ravel(), minlength=BITS), counts,
                                  out=np.full(BITS, 0.5), where=counts > 0)  # a bit no block holds: no vote
                value = int(_hex(votes > 0.5), 16)
                vote = float(np.abs(votes - 0.5).mean())
                key = min(_rotate(value, shift) for shift in range(BITS))
                if vote > clarity.get(key, -1.0):
                    clarity[key], found[key] = vote, value
    best = sorted(clarity, key=clarity.__getitem__, reverse=True)[:keep]
    return [f"{_rotate(found[key], shift):0{BITS // 4}x}" for key in best for shift in range(BITS)]


def _rotate(value: int, shift: int) -> int:
    mask = (1 << BITS) - 1
    return ((value << shift) | (value >> (BITS - shift))) & mask if shift else value


def _block_scores(bgr: np.ndarray) -> np.ndarray:
    """imwatermark's per-block bit (``EmbedDwtDctSvd.infer_dct_svd``) for every 4 x 4 block of
    the U channel's DWT approximation, at once: the DCT is orthonormal, so the block's largest
    singular value is its DCT's."""
    import cv2
    import pywt

    rows, columns = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    channel = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)[:rows, :columns, 1]
    approximation = pywt.dwt2(channel, "haar")[0]
    block_rows, block_columns = approximation.shape[0] // BLOCK, approximation.shape[1] // BLOCK
    blocks = (approximation[: block_rows * BLOCK, : block_columns * BLOCK]
              .reshape(block_rows, BLOCK, block_columns, BLOCK).swapaxes(1, 2))
    largest = np.linalg.svd(blocks, compute_uv=False)[..., 0]
    scale = SCALES[1]
    return ((largest % scale) > scale * 0.5).astype(np.float64)


def _bits(mark_id: str) -> list[int]:
    value = int(mark_id, 16)
    return [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)]


def _hex(bits: Iterable[object]) -> str:
    value = 0
    for bit in bits:
        value = (value << 1) | int(bool(bit))
    return f"{value:0{BITS // 4}x}"
