"""The model registry as the API shows it (``GET /v1/models``): names a batch may put in ``params.model``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.schemas.common import ResponseModel


class ModelOut(ResponseModel):
    """One registry model. Its folder stays on the workers: clients choose by name."""

    name: str = Field(description="what a batch puts in params.model")
    kind: Literal["one-step", "few-step", "multi-step", "refiner"]
    steps: int = Field(description="Euler steps a batch naming the model gets when it sets none")
    guidance: float = Field(description="guidance scale a batch naming the model gets when it sets none")
    description: str
    default: bool = Field(description="the model of a batch that names none (or names 'default')")


class ModelList(ResponseModel):
    default: str = Field(description="the registry name 'default' stands for")
    models: list[ModelOut]
