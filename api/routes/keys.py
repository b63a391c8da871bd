"""API keys (admin only): create (the key is shown once), list, revoke."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.deps import AdminDep, SessionDep, require_json_body
from api.errors import KEYED, WITH_BODY, APIError, error_responses, not_found
from api.schemas import KeyCreate, KeyCreated, KeyOut
from core import keys

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated, dependencies=[Depends(require_json_body)],
             responses=error_responses(*KEYED, *WITH_BODY),
             summary="Create a key; the response shows it once")
def create_key(body: KeyCreate, session: SessionDep, principal: AdminDep) -> KeyCreated:
    try:
        key, plaintext = keys.create_key(session, body.name, body.role, body.team, actor=principal.actor)
    except keys.InvalidKeySpec as exc:
        raise APIError(422, str(exc)) from None
    session.commit()
    return KeyCreated.model_validate({**KeyOut.model_validate(key).model_dump(), "key": plaintext})


@router.get("", response_model=list[KeyOut], responses=error_responses(*KEYED), summary="Keys, oldest first (never the keys themselves)")
def list_keys(session: SessionDep, principal: AdminDep,
              include_revoked: Annotated[bool, Query()] = False) -> list[KeyOut]:
    return [KeyOut.model_validate(key) for key in keys.list_keys(session, include_revoked)]


@router.post("/{key_id}/revoke", response_model=KeyOut,
             responses=error_responses(*KEYED, 404, meanings={404: "no such key"}), summary="Revoke a key (by id or shown prefix)")
def revoke_key(key_id: str, session: SessionDep, principal: AdminDep) -> KeyOut:
    if "\x00" in key_id:
        raise not_found("key")
    try:
        key = keys.revoke_key(session, key_id, actor=principal.actor)
    except keys.UnknownKey:
        raise not_found("key") from None
    session.commit()
    return KeyOut.model_validate(key)
