"""The InstaBatch HTTP API: ``uvicorn api.main:app`` or ``instabatch serve``.

``create_app()`` reads no settings while it builds the app, so tests (and the CLI) can set the
environment first; every request reads the current settings. At startup the thread limiter and
the database permits are sized from ``DB_POOL_SIZE`` together (see ``api/deps.py`` for why).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.deps import db_permits
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, RequestContext, RequestMetrics
from api.routes import (
    audit, batches, brand, canary, delivery, health, items, keys, models, objects, review, teams, verify,
)
from api.schemas import BatchCreate
from api.schemas.catalogue import CatalogueBatchCreate
from core.logs import configure_logging
from core.settings import get_settings

API_PREFIX = "/v1"
DESCRIPTION = """Bulk product images with one-step InstaFlow generation.

Authenticate with `Authorization: Bearer <api key>`. Every error is
`{"error": {"code", "message", "details"}}` with a 4xx status for bad input."""


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    db_permits()  # threads = permits = DB_POOL_SIZE on this event loop, before the first request
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="InstaBatch", version="1", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(batches.router, prefix=API_PREFIX)
    app.include_router(delivery.router, prefix=API_PREFIX)
    app.include_router(items.router, prefix=API_PREFIX)
    app.include_router(objects.router, prefix=API_PREFIX)
    app.include_router(keys.router, prefix=API_PREFIX)
    app.include_router(brand.router, prefix=API_PREFIX)
    app.include_router(audit.router, prefix=API_PREFIX)
    app.include_router(teams.router, prefix=API_PREFIX)
    app.include_router(canary.router, prefix=API_PREFIX)
    app.include_router(verify.router, prefix=API_PREFIX)
    app.include_router(models.router, prefix=API_PREFIX)
    app.include_router(review.router)  # /v1/review, /v1/images/{id}/review, contact sheets, the /review page
    # Added last = outermost: the size limit answers 413 before anything reads the body.
    app.add_middleware(RequestMetrics)
    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestContext)  # outermost: even a 413 is logged with its request id
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the models of bodies that routes parse themselves (JSON or CSV)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (BatchCreate, CatalogueBatchCreate):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
