"""Building blocks of the request and response models."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# storable_text lives in core/text.py (core/ models use it too, with its Text type).
from core.text import NO_NUL, storable_text
from models.base import as_utc


class RequestModel(BaseModel):
    """A request body part: unknown fields are errors, and JSON types are not coerced ("5" is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def stripped(value: str) -> str:
    return value.strip()


# The OpenAPI schema states what the validators accept, so a client (and schemathesis, which
# holds the live API to it) can tell a valid body from one that gets a 422.
NON_BLANK = r"^[^\x00]*[^\x00\s][^\x00]*$"  # something besides spaces once trimmed
StrippedText = Annotated[str, AfterValidator(storable_text), AfterValidator(stripped),
                         Field(json_schema_extra={"pattern": NO_NUL})]
# Required text: each field's validator refuses what is blank once trimmed (with its own message).
NonBlankText = Annotated[str, AfterValidator(storable_text), AfterValidator(stripped),
                         Field(json_schema_extra={"pattern": NON_BLANK})]
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def not_a_number(value: Any) -> Any:
    """pydantic takes ``0.5`` for a Unix time; a date-time parameter is an ISO 8601 string only."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value):
        raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z, not a number")
    return value


# A date-time in a query string (format: date-time in the schema, and nothing else accepted).
QueryDatetime = Annotated[datetime, BeforeValidator(not_a_number)]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any  # field errors (a list), facts such as retry_after_s (an object), or null


class ErrorOut(BaseModel):
    """Every error response: ``{"error": {"code", "message", "details"}}`` (api/errors.py)."""

    error: ErrorBody
