"""Verifying a file anyone hands us: its C2PA manifest, its watermark, and what the ledger knows.

Shared by ``instabatch credentials verify`` and ``POST /v1/verify``. The ledger is searched by the
file's sha256 (the file exactly as generated), by the manifest's link (item id and index, when
the manifest is valid), then by the watermark's id (a re-encoded or stripped copy). A watermark
decode always yields 32 bits, even from an unmarked image: only an id the ledger knows counts.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import watermark
from core.credentials import ManifestReport, read_manifest, read_pem, sniff_mime_type
from core.settings import Settings
from models import Batch, Image, Item


class UnreadableImage(ValueError):
    """The bytes are not an image we can decode."""


@dataclass
class LedgerMatch:
    """An image row the file maps to, and how it was found."""

    found_by: str  # sha256 | manifest | watermark
    image_id: str
    item_id: str
    batch_id: str
    batch_name: str
    team: str
    external_id: str | None
    index: int
    model_id: str
    weights_sha256: str
    qc_verdict: str | None
    review_status: str | None
    same_file: bool  # the file's sha256 is the stored image's


@dataclass
class Verification:
    sha256: str
    size: int
    format: str | None
    width: int
    height: int
    manifest: ManifestReport
    watermark_id: str | None = None  # the known id the pixels carry, when one was found
    watermark_checked: bool = False
    matches: list[LedgerMatch] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.size, "format": self.format, "width": self.width,
                "height": self.height, "manifest": self.manifest.as_dict(),
                "watermark": {"checked": self.watermark_checked, "found": self.watermark_id is not None,
                              "id": self.watermark_id},
                "matches": [asdict(match) for match in self.matches]}


def trust_anchors(settings: Settings) -> bytes | None:
    return read_pem(settings.c2pa_trust_anchors) if settings.c2pa_trust_anchors else None


def verify(data: bytes, *, anchors: bytes | None, session: Session | None = None,
           can_see_team: Callable[[str], bool] = lambda team: True) -> Verification:
    """Everything that can be told about ``data``; ledger matches only from teams ``can_see_team``."""
    picture = _open(data)
    result = Verification(sha256=hashlib.sha256(data).hexdigest(), size=len(data), format=sniff_mime_type(data),
                          width=picture.width, height=picture.height, manifest=read_manifest(data, anchors))
    if session is None:
        return result
    result.watermark_checked = watermark.readable(picture.width, picture.height)
    matches = _by_sha256(session, result.sha256) or _by_manifest(session, result.manifest)
    if not matches and result.watermark_checked:
        result.watermark_id, matches = _by_watermark(session, watermark.candidates(picture))
    result.matches = [match for match in matches if can_see_team(match.team)]
    if result.matches and result.watermark_id is None and result.watermark_checked:
        result.watermark_id = _carried_id(session, result.matches[0].image_id, picture)
    return result


def _open(data: bytes) -> PILImage.Image:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bytes that are no image
        raise UnreadableImage(f"not a readable image ({type(exc).__name__})") from None


def _rows(session: Session, *conditions: Any) -> list[tuple[Image, Item, Batch]]:
    query = (select(Image, Item, Batch).join(Item, Item.id == Image.item_id).join(Batch, Batch.id == Image.batch_id)
             .where(*conditions).order_by(Image.created_at))
    return [tuple(row) for row in session.execute(query).all()]


def _matches(rows: Iterable[tuple[Image, Item, Batch]], found_by: str, sha256: str | None) -> list[LedgerMatch]:
    return [LedgerMatch(found_by=found_by, image_id=image.id, item_id=item.id, batch_id=batch.id,
                        batch_name=batch.name, team=batch.team, external_id=item.external_id, index=image.index,
                        model_id=image.model_id, weights_sha256=image.weights_sha256, qc_verdict=image.qc_verdict,
                        review_status=image.review_status, same_file=image.sha256 == sha256)
            for image, item, batch in rows]


def _by_sha256(session: Session, digest: str) -> list[LedgerMatch]:
    return _matches(_rows(session, Image.sha256 == digest), "sha256", digest)


def _by_manifest(session: Session, manifest: ManifestReport) -> list[LedgerMatch]:
    """The manifest's link to the ledger, trusted only when its signature and hash binding hold."""
    link = manifest.ledger
    if not (manifest.valid and link.get("item_id") and isinstance(link.get("index"), int)):
        return []
    return _matches(_rows(session, Image.item_id == link["item_id"], Image.index == link["index"]), "manifest", None)


def _by_watermark(session: Session, candidates: Iterable[tuple[str, str]]) -> tuple[str | None, list[LedgerMatch]]:
    """The first decoded id the ledger knows (the pixels as they are, rescaled, realigned)."""
    for candidate, how in candidates:
        rows = _rows(session, Image.watermark_id == candidate)
        if rows:
            return candidate, _matches(rows, "watermark" if how == "as_is" else f"watermark_{how}", None)
    return None, []


def _carried_id(session: Session, image_id: str, picture: PILImage.Image) -> str | None:
    """The matched image's watermark id, when these pixels still decode to it."""
    expected = session.scalar(select(Image.watermark_id).where(Image.id == image_id))
    if expected is None:
        return None
    return expected if any(found == expected for found, _ in watermark.candidates(picture)) else None
