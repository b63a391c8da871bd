"""Canary roll-out: a batch's canary, a team's canary, and the QC verdicts per model (core/canary.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from api.schemas.common import RequestModel, ResponseModel, UtcDatetime
from core.canary import MAX_TEAM_FRACTION


def _model_names_schema(schema: dict[str, Any]) -> None:
    from core.registry import get_registry

    schema["enum"] = get_registry().names()


def _known_model(value: str) -> str:
    from core.registry import get_registry

    get_registry().resolve(value)  # UnknownModelError (a ValueError) lists the names served
    return value


class CanaryIn(RequestModel):
    """``canary`` of a batch request: this fraction of its items runs the candidate model instead."""

    model: str = Field(description="a registry name (GET /v1/models) other than the batch's model",
                       json_schema_extra=_model_names_schema)
    fraction: float = Field(gt=0.0, le=1.0, allow_inf_nan=False,
                            description="share of the items, rounded to whole items (0.3 of 10 is 3)")

    _model = field_validator("model")(classmethod(lambda cls, value: _known_model(value)))


class CanaryStart(RequestModel):
    """The body of ``PUT /v1/teams/{team}/canary``."""

    model: str = Field(description="the candidate: a registry name other than the team's default model",
                       json_schema_extra=_model_names_schema)
    fraction: float = Field(gt=0.0, le=MAX_TEAM_FRACTION, allow_inf_nan=False,
                            description=f"share of each batch's items, at most {MAX_TEAM_FRACTION}")

    _model = field_validator("model")(classmethod(lambda cls, value: _known_model(value)))


class ModelVerdicts(ResponseModel):
    """QC verdicts of the images one model made (``images.model_id``)."""

    model: str
    images: int
    pass_: int = Field(alias="pass", serialization_alias="pass")
    review: int
    reject: int
    unchecked: int
    pass_rate: float
    review_rate: float
    reject_rate: float


class CanaryOut(ResponseModel):
    id: int
    team: str
    model: str = Field(description="the candidate")
    base_model: str = Field(description="the team's default model when the canary started")
    fraction: float
    state: Literal["active", "promoted", "rolled_back"]
    started_by: str
    started_at: UtcDatetime
    ended_by: str | None
    ended_at: UtcDatetime | None
    batches: int = Field(description="batches submitted under it")
    by_model: list[ModelVerdicts] = Field(description="QC verdicts per model over its batches")


class TeamCanaryOut(ResponseModel):
    team: str
    default_model: str = Field(description="what the team's batches run when they name no model")
    active: CanaryOut | None
    history: list[CanaryOut] = Field(description="the team's ended canaries, newest first")
