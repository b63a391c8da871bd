"""Reading a prompt file for ``instabatch run``: CSV or JSON Lines, validated exactly as the API does.

CSV: a header naming ``prompt`` and any of ``external_id,seed,num_images``. JSONL: one item object
per line (``{"prompt": ..., "external_id"?, "seed"?, "num_images"?}``). The batch's params come from
the command line; both go through the API's own models, so a file the CLI accepts the API accepts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.ledger import BatchSpec

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class InputError(ValueError):
    """The prompt file (or an option) is not valid; the message says where and why."""


def read_batch(path: Path, *, name: str, params: dict[str, Any]) -> BatchSpec:
    from api.errors import APIError

    body = path.read_bytes()
    try:
        if path.suffix.lower() in JSONL_SUFFIXES or body.lstrip()[:1] == b"{":
            return _jsonl_batch(body, name, params)
        return _csv_batch(body, name, params)
    except APIError as error:
        details = f": {json.dumps(error.details, default=str)}" if error.details else ""
        raise InputError(f"{path}: {error.message}{details}") from None


def _csv_batch(body: bytes, name: str, params: dict[str, Any]) -> BatchSpec:
    from api.intake import csv_batch

    return csv_batch(body, {"name": name, "params": params}).to_spec()


def _jsonl_batch(body: bytes, name: str, params: dict[str, Any]) -> BatchSpec:
    from api.intake import jsonl_batch

    return jsonl_batch(body, {"name": name, "params": params}).to_spec()
