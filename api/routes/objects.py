"""Stored images behind signed, expiring URLs (the local store's stand-in for S3 presigning)."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from api.errors import APIError, error_responses, not_found
from api.signing import check_signature
from core.storage import LocalObjectStore, ObjectStoreError, get_store

router = APIRouter(prefix="/objects", tags=["objects"])


@router.get(
    "/{key:path}", response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(403, 404, 422, meanings={
        403: "bad or expired signature", 404: "no such object"})},
    summary="An object by key; needs the expires/sig pair from an image URL, no API key",
)
def get_object(
    key: str,
    expires: Annotated[int, Query(ge=0, le=2**40)],
    sig: Annotated[str, Query(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")],
) -> Response:
    if not check_signature(key, expires, sig):
        raise APIError(403, "the link's signature is wrong or has expired", code="bad_signature")
    cache = {"Cache-Control": f"private, max-age={max(0, expires - int(time.time()))}"}
    store = get_store()
    try:
        if isinstance(store, LocalObjectStore):
            path = store.path_of(key)
            if not path.is_file():
                raise not_found("object")
            meta = store.head(key) or {}
            return FileResponse(path, media_type=meta.get("content_type", "image/png"), headers=cache)
        data = store.get(key)
    except (KeyError, ObjectStoreError, ValueError):
        raise not_found("object") from None
    meta = store.head(key) or {}
    return Response(data, media_type=meta.get("content_type", "image/png"), headers=cache)
