"""Results rows (``GET /v1/batches/{id}/results``), progress events and the batch report.

The same models parse what the API sends on the client side (``client/``), so the two cannot drift.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from api.schemas.batches import BatchOut
from api.schemas.canary import ModelVerdicts
from api.schemas.common import ResponseModel, UtcDatetime

# Columns of the CSV form, in order (the JSONL form has the same keys).
RESULT_COLUMNS = (
    "item_id", "seq", "external_id", "prompt", "seed", "state", "error", "image_id", "image_index",
    "parent_image_id", "verdict", "qc_reasons", "decision", "sha256", "width", "height", "format", "bytes",
    "object_key", "file_name", "url", "model",
)


class ResultRow(ResponseModel):
    """One image of a batch, or one item that has no image (its image fields empty)."""

    item_id: str
    seq: int
    external_id: str | None
    prompt: str
    seed: int
    state: str
    error: str | None = None
    image_id: str | None = None
    image_index: int | None = None
    parent_image_id: str | None = Field(None, description="set on an image made by a reviewer's regenerate")
    verdict: str | None = Field(None, description="QC verdict: pass, review or reject")
    qc_reasons: list[str] = Field(default_factory=list)
    decision: str | None = Field(None, description="review decision: approved, rejected or regenerated")
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = Field(None, description="file format, from the object key (png)")
    bytes: int | None = Field(None, description="object size; filled in the archive's manifest only")
    object_key: str | None = None
    file_name: str | None = Field(None, description="the image's path in archive.zip and in a client download")
    url: str | None = Field(None, description="time-limited download URL (presigned S3, or signed /v1/objects)")
    model: str | None = Field(None, description="the registry model that made the image (GET /v1/models)")

    def csv_cells(self) -> list[Any]:
        values = self.model_dump()
        values["qc_reasons"] = ";".join(self.qc_reasons)
        return ["" if values[column] is None else values[column] for column in RESULT_COLUMNS]


class ProgressEvent(ResponseModel):
    """The data of a ``progress`` (and the final ``completed``) server-sent event."""

    batch_id: str
    status: str
    total_items: int
    done_items: int = Field(description="items in a final state")
    counts: dict[str, int] = Field(description="items per state")
    review: dict[str, int] = Field(description="images per QC verdict and review decision")
    awaiting_review: int
    finished: bool


class ReviewerDecisions(ResponseModel):
    reviewer: str
    approved: int = 0
    rejected: int = 0
    regenerated: int = 0
    first_at: UtcDatetime | None = None
    last_at: UtcDatetime | None = None


class DecisionRecord(ResponseModel):
    at: UtcDatetime
    reviewer: str
    decision: str
    reason_code: str | None
    image_id: str
    external_id: str | None
    verdict: str | None = Field(None, description="the image's QC verdict")


class ModelUse(ResponseModel):
    model_id: str = Field(description="the registry model that ran (GET /v1/models; docs/models.md)")
    weights_sha256: str
    images: int
    refine: dict[str, Any] | None = Field(None, description="the refiner's record (model, weights sha256, ...)")


class AuditRange(ResponseModel):
    events: int
    first_seq: int | None
    last_seq: int | None
    first_at: UtcDatetime | None
    last_at: UtcDatetime | None
    last_hash: str | None = Field(None, description="hash of the batch's last event")
    chain_head_seq: int
    chain_head_hash: str
    anchor_seq: int | None = Field(None, description="the latest anchor, if it covers the batch's last event")
    anchor_hash: str | None = None
    anchor_key: str | None = None
    covered: bool = Field(description="an anchor at or after the batch's last event exists")
    verify_command: str


class BatchReport(ResponseModel):
    """The generation record of one batch, for compliance (``GET /v1/batches/{id}/report.json``)."""

    batch: BatchOut
    submitted_by: dict[str, Any] = Field(description="the API key that submitted: id, name, role, team")
    submitted_at: UtcDatetime
    code_versions: list[str]
    models: list[ModelUse]
    parameters: dict[str, Any]
    counts: dict[str, int]
    verdicts: dict[str, int]
    verdicts_by_model: list[ModelVerdicts] = Field(default_factory=list,
                                                   description="QC verdicts and rates per model that ran")
    decisions: dict[str, int]
    reviewers: list[ReviewerDecisions]
    decision_log: list[DecisionRecord] = Field(description="every review decision, oldest first")
    audit: AuditRange
    generated_at: UtcDatetime
