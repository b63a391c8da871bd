"""API key administration (admin only)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from api.schemas.common import NonBlankText, RequestModel, ResponseModel, UtcDatetime
from core.keys import MAX_NAME_CHARS, MAX_TEAM_CHARS
from models import Role

RoleName = Literal[tuple(role.value for role in Role)]  # a Literal, so strict JSON validation takes the string


class KeyCreate(RequestModel):
    name: NonBlankText = Field(min_length=1, max_length=MAX_NAME_CHARS)
    role: RoleName
    team: NonBlankText = Field(min_length=1, max_length=MAX_TEAM_CHARS)

    @field_validator("name", "team")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be blank")
        return value


class KeyOut(ResponseModel):
    id: str
    name: str
    prefix: str
    role: str
    team: str
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, only its sha256 is kept")
