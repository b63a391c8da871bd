"""Time-limited URLs for stored images.

S3 hands out presigned URLs. The local folder store cannot, so the API signs its own:
``/v1/objects/{key}?expires=<unix time>&sig=<HMAC-SHA256(key, expires)>`` — an ``<img>`` tag in the
review page can load it without an Authorization header, and the link dies after PRESIGN_SECONDS.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlencode

from core.settings import get_settings
from core.storage import get_store

OBJECTS_ROUTE = "/v1/objects/"
SECRET_FILE = "url-signing.key"


@lru_cache(maxsize=4)
def _secret_in(var_dir: Path) -> bytes:
    """A random secret kept in var_dir, created once; every API process on the machine shares it."""
    path = var_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def signing_secret() -> bytes:
    settings = get_settings()
    if settings.url_signing_secret:
        return settings.url_signing_secret.encode()
    return _secret_in(settings.var_dir.resolve())


def signature(key: str, expires: int) -> str:
    return hmac.new(signing_secret(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_object_path(key: str, expires_in: int | None = None, now: float | None = None) -> str:
    expires = int((now or time.time()) + (expires_in or get_settings().presign_seconds))
    query = urlencode({"expires": expires, "sig": signature(key, expires)})
    return f"{OBJECTS_ROUTE}{quote(key)}?{query}"


def check_signature(key: str, expires: int, sig: str, now: float | None = None) -> bool:
    if expires < (now or time.time()):
        return False
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, once a 500).
    return hmac.compare_digest(signature(key, expires).encode(), sig.encode("utf-8", "replace"))


def object_url(key: str, base_url: str) -> str | None:
    """A download URL for a stored object: presigned by the store, else signed by the API."""
    try:
        url = get_store().presigned_url(key, get_settings().presign_seconds)
    except Exception:  # noqa: BLE001 - a listing stays readable when the store is unreachable
        return None
    return url or base_url.rstrip("/") + signed_object_path(key)
