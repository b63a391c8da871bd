"""The duplicate check's look-up of a batch's earlier images, as an indexed query
(docs/architecture.md, "Cheap records").

A near duplicate's luma pHash differs in at most ``duplicate_max_distance`` bits; with at most
``qc.phash.BAND_MAX_DISTANCE`` it shares one 16-bit band exactly with the image it copies, so
the candidates are the images of the batch with an equal band (``image_phash_bands``, indexed by
batch, band and value): a few rows per image instead of every pHash of the batch per task.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from models import Image, ImagePhashBand
from qc.phash import DuplicateMatch, HashIndex, luma_bands

InLedger = Callable[[Callable[[Session], Any]], Any]


class LedgerHashIndex(HashIndex):
    """``HashIndex.nearest`` over the batch's recorded images, read per query from the ledger.

    The nearest is found among the candidates that share a band: an image further away than
    ``BAND_MAX_DISTANCE`` luma bits from every recorded one has no nearest (QC records its
    ``nearest_distance`` as None), which never changes a verdict while the duplicate threshold is
    within BAND_MAX_DISTANCE (``ImageSteps`` falls back to loading the batch's hashes otherwise).
    """

    def __init__(self, in_ledger: InLedger, batch_id: str):
        super().__init__()
        self._in_ledger = in_ledger
        self._batch_id = batch_id

    def nearest(self, value: int) -> DuplicateMatch | None:
        return self.nearest_many([value])[0]

    def nearest_many(self, values: Sequence[int]) -> list[DuplicateMatch | None]:
        """One query for the candidates of every value (a micro-batch's), each value then matched
        against the candidates that share a band with it: what one query per value would find."""
        rows = self._in_ledger(lambda session: session.execute(candidates_query(self._batch_id, values)).all())
        candidates = [(int(phash, 16), image_id) for phash, image_id in rows]
        bands = [set(enumerate(luma_bands(phash))) for phash, _ in candidates]
        matches = []
        for value in values:
            wanted = set(enumerate(luma_bands(value)))
            index = HashIndex({phash: image_id for (phash, image_id), shared in zip(candidates, bands)
                               if shared & wanted})
            matches.append(index.nearest(value))
        return matches


def candidates_query(batch_id: str, values: int | Sequence[int]):
    """The batch's images that share a luma band with any of ``values``, in id order."""
    wanted = {(band, part) for value in ([values] if isinstance(values, int) else values)
              for band, part in enumerate(luma_bands(value))}
    same_band = or_(*(and_(ImagePhashBand.band == band, ImagePhashBand.value == part) for band, part in sorted(wanted)))
    return (select(Image.phash, Image.id).distinct()
            .join(ImagePhashBand, ImagePhashBand.image_id == Image.id)
            .where(ImagePhashBand.batch_id == batch_id, same_band).order_by(Image.id))


def band_rows(batch_id: str, image_id: str, phash_hex: str) -> list[dict[str, Any]]:
    return [{"image_id": image_id, "band": band, "batch_id": batch_id, "value": part}
            for band, part in enumerate(luma_bands(int(phash_hex, 16)))]
