"""Batch requests and responses.

Limits that deployments tune (items per batch, prompt length, image side, images per item) come
from the settings at validation time, so the same models serve every configuration.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from api.schemas.canary import CanaryIn, ModelVerdicts
from api.schemas.common import (
    NON_BLANK,
    NonBlankText,
    RequestModel,
    ResponseModel,
    StrippedText,
    UtcDatetime,
    storable_text,
    stripped,
)
from api.schemas.review import ReviewCounts
from core.ledger import BatchSpec, ItemSpec
from core.params import MAX_SEED, GenerationParams, RefineParams, WholeNumber, integral
from core.settings import get_settings
from models import BatchStatus, ItemState

Priority = Literal["low", "normal", "high"]
MAX_NAME_CHARS = 200  # batches.name, items.external_id
MAX_URL_CHARS = 2000  # batches.webhook_url
# What the webhook validator accepts, stated in the schema too: scheme, a host, an optional port,
# then no space or control character (a URL has them percent-encoded).
WEBHOOK_URL = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][^\x00-\x20\x7f]*)?$"
WebhookUrl = Annotated[str, AfterValidator(storable_text), Field(json_schema_extra={"pattern": WEBHOOK_URL})]


def _limit_schema(keyword: str, setting: str) -> Callable[[dict[str, Any]], None]:
    """A JSON schema limit read from the settings when the schema is built (the validators read them too)."""
    def extra(schema: dict[str, Any]) -> None:
        schema[keyword] = getattr(get_settings(), setting)
    return extra


def _prompt_schema(schema: dict[str, Any]) -> None:
    schema.update(pattern=NON_BLANK, maxLength=get_settings().max_prompt_chars)


# A request's params never carry the logo: it comes from the team's brand rules (api/catalogue.py,
# brand_params refuses one), so the schema allows only null there.
RequestedParams = Annotated[GenerationParams, Field(json_schema_extra={"properties": {"logo": {
    "type": "null", "description": "set from the team's brand rules (PUT /v1/teams/{team}/logo), never by a request"}}})]


class ItemIn(RequestModel):
    prompt: Annotated[str, AfterValidator(storable_text), AfterValidator(stripped)] = Field(
        json_schema_extra=_prompt_schema)
    external_id: StrippedText | None = Field(None, max_length=MAX_NAME_CHARS)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(integral)] | None = None
    num_images: WholeNumber = Field(1, ge=1, json_schema_extra=_limit_schema("maximum", "max_images_per_item"))

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, value: str) -> str:
        limit = get_settings().max_prompt_chars
        if not 1 <= len(value) <= limit:
            raise ValueError(f"must have 1 to {limit} characters after trimming spaces (got {len(value)})")
        return value

    @field_validator("num_images")
    @classmethod
    def _images(cls, value: int) -> int:
        limit = get_settings().max_images_per_item
        if value > limit:
            raise ValueError(f"must be at most {limit}")
        return value

    def to_spec(self) -> ItemSpec:
        return ItemSpec(prompt=self.prompt, external_id=self.external_id or None, seed=self.seed,
                        num_images=self.num_images)


class BatchCreate(RequestModel):
    """The body of ``POST /v1/batches``."""

    name: NonBlankText = Field(default_factory=lambda: default_name(), max_length=MAX_NAME_CHARS,
                               description="default: an upload's file name, else 'batch <UTC date and time>'")
    items: list[ItemIn] = Field(min_length=1, description="at most MAX_ITEMS_PER_BATCH",
                                json_schema_extra=_limit_schema("maxItems", "max_items_per_batch"))
    params: RequestedParams = Field(default_factory=GenerationParams)
    priority: Priority = "normal"
    webhook_url: WebhookUrl | None = Field(None, max_length=MAX_URL_CHARS, description="http or https URL")
    canary: CanaryIn | None = Field(None, description="send a fraction of the items to a candidate model, to "
                                    "compare QC verdicts (docs/models.md); default: the team's canary, if any")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("items", mode="before")
    @classmethod
    def _items_limit(cls, value: Any) -> Any:
        # Before validation: a too-long list is refused without validating every item first.
        limit = get_settings().max_items_per_batch
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"a batch holds at most {limit} items (got {len(value)})")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(WEBHOOK_URL, value):  # fullmatch: "$" alone would let a trailing newline by
            raise ValueError("must be an http:// or https:// URL with a host (name or IPv4 address, optional port)")
        return value

    def to_spec(self) -> BatchSpec:
        return BatchSpec(
            name=self.name, items=[item.to_spec() for item in self.items],
            params=self.params.model_dump(mode="json"), priority=self.priority, webhook_url=self.webhook_url,
        )


class BatchOut(ResponseModel):
    id: str
    name: str
    team: str
    status: BatchStatus
    priority: str
    params: dict[str, Any]
    webhook_url: str | None
    idempotency_key: str | None
    submitted_by: str | None
    total_items: int
    total_images: int
    brand_rules_version: int | None = Field(None, description="the team's brand rules it was made under")
    canary: dict[str, Any] | None = Field(None, description="the canary its items were split by: candidate model, "
                                          "fraction, items, source (team or request), the candidate's params")
    by_model: list[ModelVerdicts] | None = Field(None, description="QC verdicts per model that ran (canary batches)")
    counts: dict[str, int] = Field(description="items per state")
    progress: float = Field(description="share of items in a final state, 0 to 1")
    review: ReviewCounts = Field(default_factory=ReviewCounts, description="images per QC verdict and review decision")
    created_at: UtcDatetime
    cancel_requested_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class BatchPage(ResponseModel):
    batches: list[BatchOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class CancelResult(ResponseModel):
    batch: BatchOut
    items_cancelled: int


class RetryResult(ResponseModel):
    batch: BatchOut
    items_requeued: int


def default_name(filename: str | None = None, now: datetime | None = None) -> str:
    """A batch's name when none is given: the upload's file name without its extension, else the time."""
    if filename:
        stem = PurePosixPath(PureWindowsPath(filename).name).stem.strip()
        if stem:
            return stem[:MAX_NAME_CHARS]
    return f"batch {(now or datetime.now(timezone.utc)):%Y-%m-%d %H:%M:%S} UTC"


def progress_of(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    done = sum(counts.get(state, 0) for state in ItemState.finished())
    return round(done / total, 6) if total else 0.0


__all__ = [
    "BatchCreate", "BatchOut", "BatchPage", "CancelResult", "GenerationParams", "ItemIn", "RefineParams",
    "RetryResult", "default_name", "progress_of",
]
