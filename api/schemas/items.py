"""Item, image, QC and review responses."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from api.schemas.common import ResponseModel, UtcDatetime
from api.schemas.verify import CredentialsOut


class QcResultOut(ResponseModel):
    scorer: str
    scorer_version: str
    verdict: str
    metrics: dict[str, Any]
    thresholds: dict[str, Any] | None
    reasons: list[str] | None
    created_at: UtcDatetime


class ReviewOut(ResponseModel):
    id: str
    decision: str
    reason_code: str | None
    comment: str | None
    reviewer_name: str | None
    new_image_id: str | None
    regeneration_attempts: int = Field(0, description="runs of the regenerate task started so far")
    regeneration_error: str | None = Field(None, description="why the regeneration ended without an image")
    created_at: UtcDatetime


class ImageOut(ResponseModel):
    id: str
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    storage_key: str
    url: str | None = Field(None, description="time-limited download URL (presigned S3, or signed /v1/objects)")
    model_id: str
    weights_sha256: str
    parent_image_id: str | None
    refine: dict[str, Any] | None
    qc_verdict: str | None
    qc_reasons: list[str] | None
    scores: dict[str, dict[str, Any]] = Field(default_factory=dict, description="QC metrics per scorer")
    review_status: str | None
    credentials: CredentialsOut | None = Field(None, description="C2PA manifest and watermark state")
    created_at: UtcDatetime


class ImageDetail(ImageOut):
    qc_results: list[QcResultOut] = Field(default_factory=list)
    reviews: list[ReviewOut] = Field(default_factory=list)
    timings: dict[str, Any] | None = None


class ItemOut(ResponseModel):
    id: str
    batch_id: str
    seq: int
    external_id: str | None
    prompt: str
    seed: int
    num_images: int
    state: str
    attempts: int
    error: str | None
    verdict: str | None = Field(None, description="the worst QC verdict among its images (reject > review > pass)")
    images: list[ImageOut] = Field(default_factory=list)
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class ItemPage(ResponseModel):
    items: list[ItemOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class ItemDetail(ItemOut):
    batch_name: str
    team: str
    images: list[ImageDetail] = Field(default_factory=list)
