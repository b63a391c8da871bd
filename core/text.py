"""Text the ledger can store: PostgreSQL refuses a NUL character, and its JSONB a lone surrogate too,
with an error that would be a 500. Request models of api/ and core/ refuse both up front (a 422),
and state the NUL rule in their JSON schema (tests/test_api_schema.py holds the API to it)."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field


def storable_text(value: str) -> str:
    """Text that PostgreSQL can store: no NUL character, no lone UTF-16 surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (lone surrogate)") from None
    return value


NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, AfterValidator(storable_text), Field(json_schema_extra={"pattern": NO_NUL})]
