"""Reading a prompt file for ``instabatch run``: CSV or JSON Lines, validated exactly as the API does.

CSV: a header naming ``prompt`` and any of ``external_id,seed,num_images``. JSONL: one item object
per line (``{"prompt": ..., "external_id"?, "seed"?, "num_images"?}``). The batch's params come from
the command line; both go through the API's own models, so a file the CLI accepts the API accepts.

With ``--template T.json`` the file is a catalogue instead: a CSV with a header of any columns, or
a JSON array of row objects, expanded by the template (``examples/catalogue-template.json``).
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
    return read_request(path, name=name, params=params).to_spec()


def read_request(path: Path, *, name: str, params: dict[str, Any], template: Path | None = None) -> Any:
    """The file as the API would take it: a ``BatchCreate``, or a ``CatalogueBatchCreate`` with a template."""
    from api.errors import APIError

    body = path.read_bytes()
    try:
        if template is not None:
            return _catalogue_batch(body, template, name, params)
        if path.suffix.lower() in JSONL_SUFFIXES or body.lstrip()[:1] == b"{":
            return _jsonl_batch(body, name, params)
        return _csv_batch(body, name, params)
    except APIError as error:
        raise InputError(f"{path}: {api_error_text(error)}") from None


def api_error_text(error: Any) -> str:
    details = f": {json.dumps(error.details, default=str)}" if error.details else ""
    return f"{error.message}{details}"


def _csv_batch(body: bytes, name: str, params: dict[str, Any]) -> Any:
    from api.intake import csv_batch

    return csv_batch(body, {"name": name, "params": params})


def _catalogue_batch(body: bytes, template: Path, name: str, params: dict[str, Any]) -> Any:
    from api.catalogue import parse_catalogue

    try:
        spec = json.loads(template.read_text())
    except ValueError as error:
        raise InputError(f"{template} is not JSON: {error}") from None
    text = body.decode("utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            source: dict[str, Any] = {"rows": json.loads(text)}
        except ValueError as error:
            raise InputError(f"the catalogue is not a JSON array of rows: {error}") from None
    else:
        source = {"catalogue_csv": text}
    return parse_catalogue({"name": name, "template": spec, "params": params, **source})


def _jsonl_batch(body: bytes, name: str, params: dict[str, Any]) -> Any:
    from api.intake import jsonl_batch

    return jsonl_batch(body, {"name": name, "params": params})
