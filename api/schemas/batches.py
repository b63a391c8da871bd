"""Batch requests and responses.

Limits that deployments tune (items per batch, prompt length, image side, images per item) come
from the settings at validation time, so the same models serve every configuration.
"""
from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from api.schemas.common import RequestModel, ResponseModel, StrippedText, Text, UtcDatetime
from api.schemas.review import ReviewCounts
from core.ledger import MAX_SEED, BatchSpec, ItemSpec
from core.settings import get_settings
from models import BatchStatus, ItemState

Priority = Literal["low", "normal", "high"]
MAX_NAME_CHARS = 200  # batches.name, items.external_id
MAX_URL_CHARS = 2000  # batches.webhook_url
MAX_GUIDANCE = 20.0
MAX_STEPS = 50


class RefineParams(RequestModel):
    """``params.refine``. Mirrors ``instaflow.refine.RefineParams``, which the API cannot import
    (that module loads torch, and the API never does)."""

    enabled: bool = False
    strength: float = Field(0.3, ge=0.1, le=0.9, allow_inf_nan=False,
                            description="share of the flow re-run by the refiner")
    steps: int = Field(4, ge=1, le=MAX_STEPS, description="refiner steps")
    upscale: Literal[1, 2] = Field(1, description="resize factor before refining")


class GenerationParams(RequestModel):
    """``params``: how every image of the batch is generated."""

    width: int | None = Field(None, description="multiple of 8 within MIN/MAX_IMAGE_SIDE; default: the model's size")
    height: int | None = Field(None, description="multiple of 8 within MIN/MAX_IMAGE_SIDE; default: the model's size")
    guidance_scale: float = Field(0.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                  description="0 = InstaFlow's single pass; > 1 turns on classifier-free guidance")
    num_inference_steps: int = Field(1, ge=1, le=MAX_STEPS, description="Euler steps; 1 for InstaFlow")
    negative_prompt: Text | None = Field(None, description="only with guidance_scale > 1")
    refine: RefineParams = Field(default_factory=RefineParams)
    model: Literal["default"] = "default"

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return value
        settings = get_settings()
        if value % 8 or not settings.min_side <= value <= settings.max_side:
            raise ValueError(f"must be a multiple of 8 from {settings.min_side} to {settings.max_side}")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_length(cls, value: str | None) -> str | None:
        if value is not None and len(value) > get_settings().max_prompt_chars:
            raise ValueError(f"must have at most {get_settings().max_prompt_chars} characters")
        return value

    @model_validator(mode="after")
    def _negative_prompt_needs_guidance(self) -> "GenerationParams":
        if self.negative_prompt and self.guidance_scale <= 1.0:
            raise ValueError(
                "negative_prompt needs guidance_scale > 1: with guidance off the model runs one "
                "conditional pass and has nowhere to use a negative prompt"
            )
        return self

    @model_validator(mode="after")
    def _refined_size_within_bounds(self) -> "GenerationParams":
        """Upscaling doubles the stored image: the refined size must respect MAX_IMAGE_SIDE too."""
        max_side = get_settings().max_side
        if self.refine.enabled and self.refine.upscale == 2:
            too_large = [side for side in (self.width, self.height) if side is not None and 2 * side > max_side]
            if too_large:
                raise ValueError(f"refine.upscale 2 makes {2 * max(too_large)} pixels, over the "
                                 f"{max_side} allowed: ask for at most {max_side // 2} or upscale 1")
        return self


class ItemIn(RequestModel):
    prompt: StrippedText
    external_id: StrippedText | None = Field(None, max_length=MAX_NAME_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1)

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

    name: StrippedText = Field(max_length=MAX_NAME_CHARS)
    items: list[ItemIn] = Field(min_length=1, description="at most MAX_ITEMS_PER_BATCH")
    params: GenerationParams = Field(default_factory=GenerationParams)
    priority: Priority = "normal"
    webhook_url: Text | None = Field(None, max_length=MAX_URL_CHARS, description="http or https URL")

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
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
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


def progress_of(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    done = sum(counts.get(state, 0) for state in ItemState.finished())
    return round(done / total, 6) if total else 0.0


__all__ = [
    "BatchCreate", "BatchOut", "BatchPage", "CancelResult", "GenerationParams", "ItemIn", "RefineParams",
    "RetryResult", "progress_of",
]
