"""Content Credentials: an image's credential state, and the answer of ``POST /v1/verify``."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from api.schemas.common import ResponseModel


class CredentialsOut(ResponseModel):
    """What was signed into and marked on a stored image (null for images made before credentials)."""

    signed: bool = Field(description="a C2PA manifest is embedded in the stored file")
    format: str | None = Field(None, description="the signed file's MIME type")
    signer: str | None = Field(None, description="the signing certificate's subject")
    development_chain: bool = Field(False, description="signed with the UNTRUSTED development chain")
    watermark: str = Field(description="embedded, or skipped (with the reason)")
    watermark_id: str | None = Field(None, description="the id the pixels carry")
    watermark_skipped: str | None = Field(None, description="why no watermark was embedded")


class ManifestOut(ResponseModel):
    present: bool
    state: str | None = Field(None, description="c2pa validation state: Valid, Trusted or Invalid")
    valid: bool
    signer: str | None
    issuer: str | None
    trusted: bool = Field(description="the signer chains to a configured trust anchor (C2PA_TRUST_ANCHORS)")
    ai_generated: bool = Field(description="a c2pa.actions assertion says trainedAlgorithmicMedia")
    ledger: dict[str, Any] = Field(default_factory=dict, description="the manifest's link back to the ledger")
    failures: list[str] = Field(default_factory=list, description="validation failure codes")
    error: str | None = None


class WatermarkOut(ResponseModel):
    checked: bool = Field(description="false when the image is too small to carry a watermark")
    found: bool = Field(description="the pixels carry an id that the ledger knows")
    id: str | None


class LedgerMatchOut(ResponseModel):
    found_by: str = Field(description="sha256 (the file as generated), manifest, watermark (the pixels as they "
                                      "are), watermark_rescaled (a resized copy) or watermark_realigned (a cropped "
                                      "copy: one of 64 ids tried, a lead rather than proof)")
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
    review_status: str | None = Field(description="the review decision: approved, rejected, regenerated")
    same_file: bool


class VerifyOut(ResponseModel):
    sha256: str
    bytes: int
    format: str | None
    width: int
    height: int
    manifest: ManifestOut
    watermark: WatermarkOut
    matches: list[LedgerMatchOut] = Field(description="the ledger's images this file maps to (your teams only)")
