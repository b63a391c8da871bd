"""Building blocks of the request and response models."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from models.base import as_utc


class RequestModel(BaseModel):
    """A request body part: unknown fields are errors, and JSON types are not coerced ("5" is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def storable_text(value: str) -> str:
    """Text that PostgreSQL can store: no NUL character, no lone UTF-16 surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (lone surrogate)") from None
    return value


def stripped(value: str) -> str:
    return value.strip()


Text = Annotated[str, AfterValidator(storable_text)]
StrippedText = Annotated[str, AfterValidator(storable_text), AfterValidator(stripped)]
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
