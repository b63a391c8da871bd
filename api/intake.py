"""Turns the body of ``POST /v1/batches`` — JSON or a CSV upload — into a validated ``BatchCreate``.

JSON: the body is the batch (``BatchCreate``), validated strictly ("5" is not an integer).

CSV (``Content-Type: text/csv``): a header row naming some of ``prompt,external_id,seed,num_images``
(``prompt`` required, any order), one item per row; the rest of the batch comes from query
parameters, all text, converted as their fields need:

    name (required), priority, webhook_url,
    width, height, guidance_scale, num_inference_steps, negative_prompt, model,
    refine (true/false), refine_strength, refine_steps, refine_upscale

    curl -H "Authorization: Bearer $KEY" -H "Content-Type: text/csv" \
         --data-binary @products.csv "$API/v1/batches?name=spring&priority=high&width=512&height=512"
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import QueryParams

from api.deps import media_type
from api.errors import APIError, field_errors
from api.schemas import BatchCreate

JSON_TYPES = frozenset({"application/json"})
CSV_TYPES = frozenset({"text/csv", "application/csv"})
CSV_COLUMNS = ("prompt", "external_id", "seed", "num_images")

# Query parameter -> where it goes in the batch.
CSV_QUERY_FIELDS: dict[str, tuple[str, ...]] = {
    "name": ("name",),
    "priority": ("priority",),
    "webhook_url": ("webhook_url",),
    "width": ("params", "width"),
    "height": ("params", "height"),
    "guidance_scale": ("params", "guidance_scale"),
    "num_inference_steps": ("params", "num_inference_steps"),
    "negative_prompt": ("params", "negative_prompt"),
    "model": ("params", "model"),
    "refine": ("params", "refine", "enabled"),
    "refine_strength": ("params", "refine", "strength"),
    "refine_steps": ("params", "refine", "steps"),
    "refine_upscale": ("params", "refine", "upscale"),
}
QUERY_FOR_LOC = {loc: name for name, loc in CSV_QUERY_FIELDS.items()}


def parse_batch_request(content_type: str | None, body: bytes, query: QueryParams) -> BatchCreate:
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        return parse_json_batch(body, query)
    if kind in CSV_TYPES:
        return parse_csv_batch(body, query)
    raise APIError(
        415, f"unsupported Content-Type {kind or '(none)'!r}: send application/json or text/csv",
        details={"supported": sorted(JSON_TYPES | CSV_TYPES)},
    )


def parse_json_batch(body: bytes, query: QueryParams) -> BatchCreate:
    if query:
        raise query_error([(name, "query parameters are for CSV uploads; put it in the JSON body")
                           for name in query.keys()])
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, "the request body is not valid JSON", code="bad_json",
                       details={"reason": str(exc)[:200]}) from None
    try:
        return BatchCreate.model_validate(data, strict=True)
    except ValidationError as exc:
        raise APIError(422, "the batch is not valid", details=field_errors(_errors(exc), ("body",))) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return exc.errors(include_input=False, include_url=False, include_context=False)


def parse_csv_batch(body: bytes, query: QueryParams) -> BatchCreate:
    return csv_batch(body, batch_from_query(query))


def csv_batch(body: bytes, fields: dict[str, Any]) -> BatchCreate:
    """A CSV of items plus the batch's other fields (``name``, ``params``, ...), validated as one."""
    rows, lines = read_csv_items(body)
    data = {**fields, "items": rows}
    try:
        # Lax: CSV cells and query parameters are text, so "12" is the seed 12 here.
        return BatchCreate.model_validate(data, strict=False)
    except ValidationError as exc:
        raise APIError(422, "the batch is not valid", details=csv_error_details(_errors(exc), lines)) from None


def read_csv_items(body: bytes) -> tuple[list[dict[str, str]], list[int]]:
    """The CSV's rows as item dicts (empty cells left out) and the line each row starts on."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise bad_csv("the CSV is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [column.strip().lower() for column in next(reader, [])]
        check_header(header)
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) > len(header):
                raise bad_csv(f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}",
                              line=reader.line_num)
            rows.append({column: cell for column, cell in zip(header, row) if cell.strip() or column == "prompt"})
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise bad_csv(f"the CSV cannot be read: {exc}", line=reader.line_num) from None
    return rows, lines


def check_header(header: Sequence[str]) -> None:
    if not header:
        raise bad_csv("the CSV is empty: it needs a header row with at least a 'prompt' column")
    unknown = [column for column in header if column not in CSV_COLUMNS]
    if unknown or len(set(header)) != len(header) or "prompt" not in header:
        raise bad_csv(
            "the CSV header must name 'prompt' and any of 'external_id', 'seed', 'num_images', each once",
            header=list(header), unknown=unknown,
        )


def bad_csv(message: str, **details: Any) -> APIError:
    return APIError(400, message, code="bad_csv", details={**details, "columns": list(CSV_COLUMNS)})


def batch_from_query(query: QueryParams) -> dict[str, Any]:
    """The batch's non-item fields from the query string; unknown or repeated parameters are errors."""
    problems = [(name, "unknown query parameter") for name in query.keys() if name not in CSV_QUERY_FIELDS]
    problems += [(name, "given more than once") for name in set(query.keys()) if len(query.getlist(name)) > 1]
    if problems:
        raise query_error(problems)
    data: dict[str, Any] = {}
    for name, value in query.items():
        *parents, leaf = CSV_QUERY_FIELDS[name]
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return data


def query_error(problems: Sequence[tuple[str, str]]) -> APIError:
    return APIError(422, "the request is not valid", details=[
        {"field": f"query.{name}", "loc": ["query", name], "message": message, "type": "value_error"}
        for name, message in problems
    ])


def csv_error_details(errors: Sequence[Mapping[str, Any]], lines: Sequence[int]) -> list[dict[str, Any]]:
    """Item errors point at the CSV line; the others at the query parameter they came from."""
    details = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc[:1] == ("items",):
            detail = field_errors([error], ("body",))[0]
            if len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(lines):
                detail["csv_line"] = lines[loc[1]]
        else:
            name = QUERY_FOR_LOC.get(loc) or (QUERY_FOR_LOC.get(loc[:-1]) if loc else None)
            detail = field_errors([{**error, "loc": (name,) if name else loc}], ("query",))[0]
        details.append(detail)
    return details
