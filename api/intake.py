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

CSV as users have it: a UTF-8 byte-order mark is dropped, the separator is sniffed from the header
(``,``, ``;`` as Excel writes it in many locales, tab or ``|``), quoted cells may hold newlines.
JSON Lines (``Content-Type: application/x-ndjson``): one item object per line, the batch's other
fields as query parameters, like CSV. Errors name the line (and the column) of the bad row.

``name`` may be left out: it defaults to the uploaded file's name (``Content-Disposition:
attachment; filename="spring.csv"`` gives "spring"), else to "batch <UTC date and time>".
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
from api.schemas import BatchCreate, ItemIn
from api.schemas.batches import default_name

JSON_TYPES = frozenset({"application/json"})
CSV_TYPES = frozenset({"text/csv", "application/csv"})
JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/ndjson"})
CSV_DELIMITERS = ",;\t|"
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


def parse_batch_request(content_type: str | None, body: bytes, query: QueryParams,
                        filename: str | None = None) -> BatchCreate:
    """The batch in a request body; ``filename`` (of the upload) names a batch that has no name."""
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        return parse_json_batch(body, query, filename=filename)
    if kind in CSV_TYPES:
        return parse_csv_batch(body, query, filename=filename)
    if kind in JSONL_TYPES:
        return parse_jsonl_batch(body, query, filename=filename)
    raise APIError(
        415, f"unsupported Content-Type {kind or '(none)'!r}: send application/json, text/csv or "
        "application/x-ndjson", details={"supported": sorted(JSON_TYPES | CSV_TYPES | JSONL_TYPES)},
    )


def parse_json_batch(body: bytes, query: QueryParams, filename: str | None = None) -> BatchCreate:
    if query:
        raise query_error([(name, "query parameters are for CSV uploads; put it in the JSON body")
                           for name in query.keys()])
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}",
                       code="bad_json", details={"reason": exc.msg, "line": exc.lineno, "column": exc.colno}) from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, NaN, too deep
        raise APIError(400, "the request body is not valid JSON", code="bad_json",
                       details={"reason": str(exc)[:200]}) from None
    if isinstance(data, dict) and "name" not in data:
        data["name"] = default_name(filename)
    try:
        return BatchCreate.model_validate(data, strict=True)
    except ValidationError as exc:
        raise APIError(422, "the batch is not valid", details=field_errors(_errors(exc), ("body",))) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return exc.errors(include_input=False, include_url=False, include_context=False)


def parse_csv_batch(body: bytes, query: QueryParams, filename: str | None = None) -> BatchCreate:
    return csv_batch(body, with_name(batch_from_query(query), filename))


def with_name(fields: dict[str, Any], filename: str | None) -> dict[str, Any]:
    return fields if "name" in fields else {**fields, "name": default_name(filename)}


def csv_batch(body: bytes, fields: dict[str, Any]) -> BatchCreate:
    """A CSV of items plus the batch's other fields (``name``, ``params``, ...), validated as one."""
    rows, lines, header = read_csv_table(body)
    return _validated(fields, rows, lambda errors: csv_error_details(errors, lines, header, rows))


def _validated(fields: dict[str, Any], rows: list[dict[str, Any]], details: Any, strict: bool = False) -> BatchCreate:
    try:
        # Lax for CSV: cells and query parameters are text, so "12" is the seed 12 there.
        return BatchCreate.model_validate({**fields, "items": rows}, strict=strict)
    except ValidationError as exc:
        raise APIError(422, "the batch is not valid", details=details(_errors(exc))) from None


def read_csv_items(body: bytes) -> tuple[list[dict[str, str]], list[int]]:
    """The CSV's rows as item dicts (empty cells left out) and the line each row starts on."""
    rows, lines, _header = read_csv_table(body)
    return rows, lines


def read_csv_table(body: bytes) -> tuple[list[dict[str, str]], list[int], list[str]]:
    """Rows, the line each starts on (a quoted cell may span lines), and the header's columns."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body[:exc.start].count(b"\n") + 1
        raise bad_csv(f"the CSV is not UTF-8 text (line {line})", line=line) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(text))
    rows, lines, header = [], [], []
    try:
        header = [column.strip().lower() for column in next(reader, [])]
        check_header(header)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):  # else a blank line
                if len(row) > len(header):
                    raise bad_csv(f"line {start}, column {len(header) + 1}: {len(row)} fields, the header has "
                                  f"{len(header)}", line=start, column=len(header) + 1)
                rows.append({column: cell for column, cell in zip(header, row) if cell.strip() or column == "prompt"})
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise bad_csv(f"line {reader.line_num}: the CSV cannot be read: {exc}", line=reader.line_num) from None
    return rows, lines, header


def sniff_delimiter(text: str) -> str:
    """The separator the header row uses (Excel writes ``;`` where the decimal mark is a comma)."""
    first_line = text.split("\n", 1)[0]
    try:
        return csv.Sniffer().sniff(first_line, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","  # one column, or nothing to tell by


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


def csv_error_details(errors: Sequence[Mapping[str, Any]], lines: Sequence[int], header: Sequence[str] = (),
                      rows: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Item errors point at the CSV line and column; the others at the query parameter they came from.

    ``lines`` are the rows' first lines; a cell after a quoted multi-line cell sits lines further down."""
    details = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc[:1] == ("items",):
            detail = field_errors([error], ("body",))[0]
            if len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(lines):
                detail["csv_line"] = detail["line"] = lines[loc[1]]
                if len(loc) > 2 and loc[2] in header:
                    column = list(header).index(loc[2])
                    if loc[1] < len(rows):
                        row = rows[loc[1]]
                        detail["csv_line"] = detail["line"] = lines[loc[1]] + sum(
                            str(row.get(name, "")).count("\n") for name in header[:column])
                    detail["column"] = column + 1
                    detail["column_name"] = loc[2]
                detail["message"] = f"{_where(detail)}: {detail['message']}"
        else:
            name = QUERY_FOR_LOC.get(loc) or (QUERY_FOR_LOC.get(loc[:-1]) if loc else None)
            detail = field_errors([{**error, "loc": (name,) if name else loc}], ("query",))[0]
        details.append(detail)
    return details


def _where(detail: Mapping[str, Any]) -> str:
    where = f"line {detail['line']}"
    if "column" in detail:
        where += f", column {detail['column']} ({detail['column_name']})"
    return where


# -- JSON Lines ------------------------------------------------------------------------------

def parse_jsonl_batch(body: bytes, query: QueryParams, filename: str | None = None) -> BatchCreate:
    return jsonl_batch(body, with_name(batch_from_query(query), filename))


def jsonl_batch(body: bytes, fields: dict[str, Any]) -> BatchCreate:
    """JSON Lines of items plus the batch's other fields (text, as from a query string)."""
    rows, lines = read_jsonl_items(body)
    batch = _validated(fields, rows, lambda errors: jsonl_error_details(errors, lines))
    # The items are JSON, so they keep JSON's types, as in a JSON body: "5" is no seed.
    errors = [{**error, "loc": ("items", index, *error["loc"])}
              for index, row in enumerate(rows) for error in _strict_item_errors(row)]
    if errors:
        raise APIError(422, "the batch is not valid", details=jsonl_error_details(errors, lines))
    return batch


def _strict_item_errors(row: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        ItemIn.model_validate(row, strict=True)
    except ValidationError as exc:
        return _errors(exc)
    return []


def read_jsonl_items(body: bytes) -> tuple[list[dict[str, Any]], list[int]]:
    """One item object per non-blank line, and each one's line number."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body[:exc.start].count(b"\n") + 1
        raise bad_jsonl(f"line {line}: not UTF-8 text", line=line) from None
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise bad_jsonl(f"line {number}, column {exc.colno}: not JSON: {exc.msg}", line=number,
                            column=exc.colno) from None
        except (ValueError, RecursionError) as exc:
            raise bad_jsonl(f"line {number}: not JSON: {str(exc)[:200]}", line=number) from None
        if not isinstance(row, dict):
            raise bad_jsonl(f"line {number}: each line must be one item object, like "
                            '{"prompt": "...", "external_id": "sku-1"}', line=number)
        rows.append(row)
        lines.append(number)
    if not rows:
        raise bad_jsonl("the JSON Lines body has no items", line=0)
    return rows, lines


def bad_jsonl(message: str, **details: Any) -> APIError:
    return APIError(400, message, code="bad_jsonl", details={**details, "fields": list(CSV_COLUMNS)})


def jsonl_error_details(errors: Sequence[Mapping[str, Any]], lines: Sequence[int]) -> list[dict[str, Any]]:
    details = csv_error_details(errors, lines)
    for detail in details:
        detail.pop("csv_line", None)
    return details
