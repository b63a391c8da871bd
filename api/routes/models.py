"""``GET /v1/models``: the models this deployment serves (core/registry.py, docs/models.md)."""
from __future__ import annotations

from fastapi import APIRouter

from api.deps import ReaderDep
from api.errors import error_responses
from api.schemas.models import ModelList, ModelOut
from core.registry import get_registry

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList, responses=error_responses(401, 503),
            summary="The registry's models (name, kind, default steps and guidance): what params.model may name")
def list_models(_principal: ReaderDep) -> ModelList:
    registry = get_registry()
    return ModelList(default=registry.default, models=[
        ModelOut(name=spec.name, kind=spec.kind, steps=spec.steps, guidance=spec.guidance,
                 description=spec.description, default=spec.name == registry.default)
        for spec in registry.models.values()])
