"""Team limits, webhook settings and webhook deliveries."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BeforeValidator, Field

from api.schemas.common import RequestModel, ResponseModel, UtcDatetime
from core.params import integral

# An integer or null; 7806.0 counts as 7806, as JSON Schema's "integer" says (core/params.py, WholeNumber).
QueuedImagesLimit = Annotated[int, Field(ge=0, le=100_000_000), BeforeValidator(integral)] | None
SubmissionsLimit = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(integral)] | None


class LimitsUpdate(RequestModel):
    """Fields left out stay as they are; null puts the setting's default back; 0 turns a limit off."""

    max_queued_images: QueuedImagesLimit = None
    submissions_per_minute: SubmissionsLimit = None


class LimitsOut(ResponseModel):
    team: str
    max_queued_images: int = Field(description="images queued or running at once (0: no limit)")
    submissions_per_minute: int = Field(description="batches a minute (0: no limit)")
    overrides: dict[str, int] = Field(description="the limits this team overrides; the others are defaults")
    queued_images: int


class WebhookSettingsUpdate(RequestModel):
    url: AnyHttpUrl | None = Field(description="where the team's events go when a batch names no webhook_url")


class WebhookSettingsOut(ResponseModel):
    team: str
    url: str | None
    has_secret: bool
    secret_rotated_at: UtcDatetime | None


class WebhookSecret(ResponseModel):
    team: str
    secret: str = Field(description="whsec_…: shown on rotation; the previous one signs too for a grace period")


DeliveryStatus = Literal["pending", "delivered", "failed"]


class DeliveryOut(ResponseModel):
    id: str = Field(description="the webhook-id header of every try")
    team: str
    batch_id: str | None
    event: str
    url: str
    status: str
    attempts: int
    next_attempt_at: UtcDatetime | None
    last_attempt_at: UtcDatetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None
    payload: dict[str, Any]


class DeliveryPage(ResponseModel):
    deliveries: list[DeliveryOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
