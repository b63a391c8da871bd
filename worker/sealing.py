"""Content Credentials in the image steps: the watermark before encoding, the signed manifest after.

``seal`` is one job of the worker's encoder pool: the watermark on the decoded picture, the
batch's format, then the signature (together the costliest CPU steps per image); QC, which runs
beside it, judges the unmarked picture, the watermark being invisible. The signature covers the
encoded bytes before they are hashed and stored, so the
ledger's sha256 is the signed file's and the write-once keys do not change. The manifest's time
and instance id differ per signing: a retried chunk adopts the object already stored, and the
same prompt, seed, params and key give the same pixels, not the same file (docs/compliance.md,
"Content Credentials").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from core import credentials, watermark
from core.provenance import CONTENT_TYPES, Encoding, encode_image
from core.settings import Settings
from worker.version import code_version

SOFTWARE = "InstaBatch"
# Provenance fields that name the rows rather than decide the pixels: left out of the watermark id,
# so the same generation in another batch gets the same id (and the same pixels).
ROW_FIELDS = frozenset({"item_id", "batch_id", "external_id", "index"})


class Sealer:
    """Marks and signs a worker's images with the deployment's (or the team's) signing identity."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.signers = credentials.load_signers(settings)  # raises at worker start, not per item

    def mark(self, picture: Image.Image, record: dict[str, Any]) -> tuple[Image.Image, watermark.Mark]:
        return watermark.embed(picture, mark_id(record))

    def signing(self, record: dict[str, Any], *, team: str | None, submitted_hash: str | None) -> "Signing":
        """What signing one image takes, as plain data a process pool can carry (``seal``)."""
        return Signing(
            self.signers.for_team(team), title=f"{record['item_id']}-{record['index']}", version=code_version(),
            created=self._created(record, team), refined=self._refined(record),
            ledger={"item_id": record["item_id"], "batch_id": record["batch_id"], "index": record["index"],
                    "batch_submitted_event_hash": submitted_hash})

    def sign(self, data: bytes, mime_type: str, record: dict[str, Any], mark: watermark.Mark, *,
             team: str | None, submitted_hash: str | None) -> tuple[bytes, dict[str, Any]]:
        """The signed file, and the credential state the image row records."""
        return self.signing(record, team=team, submitted_hash=submitted_hash).sign(data, mime_type, mark)

    def _created(self, record: dict[str, Any], team: str | None) -> dict[str, Any]:
        created = {"model": record["model"], "weights_sha256": record["weights_sha256"], "seed": record["seed"],
                   "params": record["params"]}
        if self.settings.prompt_in_manifest(team):
            created["prompt"] = record["prompt"]
        return created

    @staticmethod
    def _refined(record: dict[str, Any]) -> dict[str, Any] | None:
        refined = {name: value for name, value in record.items() if name.startswith("refine")}
        return refined or None


@dataclass(frozen=True)
class Signing:
    """One image's manifest but its watermark (known once the pixels are marked), and who signs it."""

    identity: credentials.SigningIdentity
    title: str
    version: str
    created: dict[str, Any]
    refined: dict[str, Any] | None
    ledger: dict[str, Any]

    def sign(self, data: bytes, mime_type: str, mark: watermark.Mark) -> tuple[bytes, dict[str, Any]]:
        """The signed file, and the credential state the image row records."""
        manifest = credentials.manifest_for(title=self.title, software=SOFTWARE, version=self.version,
                                            created=self.created, refined=self.refined,
                                            ledger={**self.ledger, "watermark": mark.as_record()})
        signed = credentials.sign(data, mime_type, manifest, self.identity)
        identity = self.identity
        state = {"c2pa": {"signed": True, "format": mime_type, "signer": identity.signer,
                          "development_chain": identity.development, "tsa": bool(identity.tsa_url)},
                 "watermark": mark.as_record()}
        return signed, state


def mark_id(record: dict[str, Any]) -> str:
    """The watermark id of an image: from what decides its pixels, not from the rows it lands in."""
    return watermark.watermark_id(*(f"{name}={record[name]}" for name in sorted(record) if name not in ROW_FIELDS))


def seal(picture: Image.Image, mark: str, encoding: Encoding, record: dict[str, Any],
         signing: Signing) -> tuple[bytes, dict[str, Any]]:
    """The signed file of a picture and its credential state: watermark, encode, sign. One job of the
    encoder pool (module-level, so a process pool can run it too): the three costliest CPU steps per
    image run there together, off the finishing thread (docs/performance.md)."""
    marked, embedded = watermark.embed(picture, mark)
    return signing.sign(encode_image(marked, encoding, record), CONTENT_TYPES[encoding.format], embedded)


def embedded_watermark_id(state: dict[str, Any] | None) -> str | None:
    """The id an image's pixels carry; None when its watermark was skipped (too small)."""
    mark = (state or {}).get("watermark") or {}
    return mark.get("id") if mark.get("embedded") else None
