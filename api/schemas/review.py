"""The QA review queue, review decisions and the review counts of a batch."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from api.schemas.common import RequestModel, ResponseModel, UtcDatetime
from api.schemas.items import ReviewOut
from api.schemas.verify import CredentialsOut
from core.text import Text

REASON_CODE_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,99}$"
MAX_COMMENT_CHARS = 2000


class ReviewIn(RequestModel):
    """The body of ``POST /v1/images/{id}/review``."""

    decision: Literal["approve", "reject", "regenerate"]
    reason_code: str = Field(
        pattern=REASON_CODE_PATTERN,
        description="machine-readable why, lower-case: a QC reason it confirms (blurry, wrong_color, ...) "
                    "or a reviewer's code (acceptable, false_positive, off_brand, artifact, other)",
    )
    comment: Text | None = Field(None, max_length=MAX_COMMENT_CHARS)


class RegenerationOut(ResponseModel):
    new_image_id: str = Field(description="the id the regenerated image will have (GET /v1/items/{item_id})")
    seed: int
    generation: int = Field(description="1 for a regeneration of an original image, 2 for one of its regeneration")


class ReviewResult(ResponseModel):
    image_id: str
    item_id: str
    batch_id: str
    review_status: str
    review: ReviewOut
    regeneration: RegenerationOut | None = None


class Finding(ResponseModel):
    """One scorer that raised a reason, with what it measured and the thresholds it applied."""

    scorer: str
    verdict: str
    reasons: list[str]
    metrics: dict[str, Any]
    thresholds: dict[str, Any] | None


class QueueEntry(ResponseModel):
    image_id: str
    item_id: str
    batch_id: str
    batch_name: str
    team: str
    external_id: str | None
    prompt: str
    seed: int
    index: int
    width: int
    height: int
    verdict: str
    reasons: list[str]
    metrics: dict[str, Any] = Field(description="headline metrics, 'scorer.metric' → value")
    findings: list[Finding] = Field(description="the scorers that flagged the image")
    url: str | None = Field(description="time-limited image URL")
    parent_image_id: str | None = Field(description="set when this image regenerates another")
    parent_url: str | None = None
    twin_image_id: str | None = Field(None, description="the earlier image a near_duplicate resembles")
    twin_url: str | None = None
    credentials: CredentialsOut | None = Field(None, description="C2PA manifest and watermark state")
    created_at: UtcDatetime


class QueuePage(ResponseModel):
    entries: list[QueueEntry]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
    total: int | None = Field(None, description="images awaiting review under these filters (first page only)")


class ReviewCounts(ResponseModel):
    """Images of a batch per QC verdict, and the reviewers' decisions."""

    pass_: int = Field(0, alias="pass", serialization_alias="pass")
    review: int = 0
    reject: int = 0
    unchecked: int = Field(0, description="stored without a QC verdict")
    awaiting_review: int = Field(0, description="verdict review, no decision yet")
    approved: int = 0
    rejected: int = 0
    regenerated: int = 0
