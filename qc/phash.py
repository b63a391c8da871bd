"""Perceptual hash and near-duplicate look-up.

The hash is four 64-bit DCT pHashes in one 256-bit int: luma in the top 64
bits, then red, green and blue.  Each part follows the usual recipe: 32x32
(Lanczos), 2-D DCT-II, the 8x8 lowest frequencies, one bit per coefficient
above their median, row-major, first coefficient in the most significant bit.

Why colour: product batches are full of colour variants ("a red mug", "a blue
mug") whose grey images are alike; on renders a luma-only pHash called 8% of
such pairs duplicates, luma + colour 1% (docs/qc.md).  Two images are near
duplicates when their luma parts differ in at most ``max_distance`` bits and
no colour part differs in more than ``max_colour_distance`` bits.

Store the hash as its 64-digit hex string (``phash_to_hex``): it fits no SQL
integer type and would lose precision as a JSON number.  The worker keeps the
hashes of a batch and passes them back as ``known`` so duplicates are found
across chunks, not only within one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from qc.images import ImageInput, ImageView

HASH_SIZE = 8
DCT_SIZE = 32
PART_BITS = 64
PARTS = 4  # luma, red, green, blue
HEX_DIGITS = PARTS * PART_BITS // 4
_BIT_WEIGHTS = np.array([1 << (63 - i) for i in range(64)], dtype=np.uint64)
_PART_MASK = (1 << PART_BITS) - 1


@lru_cache(maxsize=1)
def _dct_matrix(n: int = DCT_SIZE) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def phash_channel(channel: Image.Image) -> int:
    """64-bit DCT pHash of one 8-bit channel."""
    small = np.asarray(channel.resize((DCT_SIZE, DCT_SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _dct_matrix()
    low = (dct @ small @ dct.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = (low > np.median(low)).astype(np.uint64)
    return int((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))


def phash_view(view: ImageView) -> int:
    value = phash_channel(view.grey_u8)
    for channel in view.work_pil.split():
        value = (value << PART_BITS) | phash_channel(channel)
    return value


def phash(image: ImageInput | ImageView) -> int:
    """256-bit perceptual hash (luma, R, G, B pHashes) of an image, as an unsigned int."""
    return phash_view(image if isinstance(image, ImageView) else ImageView(image))


def hash_parts(value: int) -> tuple[int, int, int, int]:
    """(luma, red, green, blue) 64-bit parts of a hash."""
    shifts = range((PARTS - 1) * PART_BITS, -1, -PART_BITS)
    return tuple((value >> shift) & _PART_MASK for shift in shifts)  # type: ignore[return-value]


# The luma part as 4 bands of 16 bits: two hashes whose luma parts differ in at most
# BAND_MAX_DISTANCE bits agree exactly on at least one band (pigeonhole), which makes the
# duplicate check an indexed equality look-up (worker/duplicates.py).
BANDS = 4
BAND_BITS = PART_BITS // BANDS
BAND_MAX_DISTANCE = BANDS - 1


def luma_bands(value: int) -> list[int]:
    """The luma part's bands, most significant first."""
    luma = hash_parts(value)[0]
    mask = (1 << BAND_BITS) - 1
    return [(luma >> (BAND_BITS * (BANDS - 1 - band))) & mask for band in range(BANDS)]


def hamming(a: int, b: int) -> tuple[int, int]:
    """(luma bits that differ, most bits that differ in one colour channel)."""
    diffs = [(x ^ y).bit_count() for x, y in zip(hash_parts(a), hash_parts(b))]
    return diffs[0], max(diffs[1:])


@dataclass(frozen=True)
class DuplicateMatch:
    ref: Any  # what the caller labelled the known hash with (image id, index, ...)
    phash: int
    distance: int  # luma bits
    colour_distance: int  # most bits in one colour channel

    def within(self, max_distance: int, max_colour_distance: int) -> bool:
        return self.distance <= max_distance and self.colour_distance <= max_colour_distance


class HashIndex:
    """Known hashes of a batch, searched with one vectorised XOR + popcount."""

    def __init__(self, known: Mapping[int, Any] | Iterable[int] | None = None) -> None:
        self._hashes: list[int] = []
        self._refs: list[Any] = []
        self._array: np.ndarray | None = None
        if known is None:
            return
        items = known.items() if isinstance(known, Mapping) else ((h, h) for h in known)
        for value, ref in items:
            self.add(value, ref)

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, value: int | str, ref: Any) -> None:
        self._hashes.append(int(value, 16) if isinstance(value, str) else int(value))
        self._refs.append(ref)
        self._array = None

    def nearest_many(self, values: Sequence[int]) -> list[DuplicateMatch | None]:
        """``nearest`` of each value; an index that answers from elsewhere (the ledger) does all in one look-up."""
        return [self.nearest(value) for value in values]

    def nearest(self, value: int) -> DuplicateMatch | None:
        """The known hash closest in luma + colour bits (the earliest on ties)."""
        if not self._hashes:
            return None
        if self._array is None:
            self._array = np.array([hash_parts(h) for h in self._hashes], dtype=np.uint64)
        diffs = np.bitwise_count(self._array ^ np.array(hash_parts(value), dtype=np.uint64))
        luma, colour = diffs[:, 0].astype(int), diffs[:, 1:].max(axis=1).astype(int)
        best = int(np.argmin(luma + colour))
        return DuplicateMatch(self._refs[best], self._hashes[best], int(luma[best]), int(colour[best]))


def find_duplicate(
    value: int,
    known: Mapping[int, Any] | Iterable[int],
    max_distance: int = 4,
    max_colour_distance: int = 8,
) -> DuplicateMatch | None:
    """The nearest known hash if it is a near duplicate (build a HashIndex for many look-ups)."""
    match = HashIndex(known).nearest(value)
    return match if match is not None and match.within(max_distance, max_colour_distance) else None
