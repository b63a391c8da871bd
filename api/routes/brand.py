"""A team's brand rules (admins write, the team reads) and its logo upload. Each change is a new version."""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import AdminDep, ReaderDep, SessionDep, media_type, require_json_body
from api.errors import KEYED, WITH_BODY, APIError, error_responses, not_found
from api.schemas.catalogue import BrandRulesOut
from core import brand
from core.keys import MAX_TEAM_CHARS
from core.params import Corner
from core.storage import get_store

router = APIRouter(prefix="/teams/{team}", tags=["brand"])
TeamPath = Annotated[str, Path(max_length=MAX_TEAM_CHARS, pattern=r"^[^\x00/]+$")]
MAX_VERSION = 2**31 - 1  # brand_rules.version is an INTEGER column: a larger one was a 500 in PostgreSQL


def rules_out(rules: brand.TeamRules) -> BrandRulesOut:
    return BrandRulesOut(team=rules.team, version=rules.version, rules=rules.rules, created_by=rules.created_by,
                         created_at=rules.created_at)


@router.get("/brand-rules", response_model=BrandRulesOut,
            responses=error_responses(*KEYED, 404, meanings={404: "no rules yet, or another team's"}),
            summary="The team's brand rules (latest, or ?version=N); its own submitters and every other role")
def get_rules(team: TeamPath, session: SessionDep, principal: ReaderDep,
              version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None) -> BrandRulesOut:
    found = brand.current_rules(session, team, version)
    if found is None or not principal.can_see_team(team):  # another team's rules are 404, like its batches
        raise not_found("brand rules")
    return rules_out(found)


@router.put("/brand-rules", response_model=BrandRulesOut, responses=error_responses(*KEYED, *WITH_BODY, 409),
            dependencies=[Depends(require_json_body)],
            summary="Set the team's brand rules: a new version, audited; batches record the version they used")
def put_rules(team: TeamPath, body: brand.BrandRules, session: SessionDep, principal: AdminDep) -> BrandRulesOut:
    if body.logo is not None and not brand.logo_uploaded(get_store(), body.logo.sha256):
        raise APIError(422, f"no logo with sha256 {body.logo.sha256} was uploaded: PUT /v1/teams/{team}/logo first",
                       code="unknown_logo")
    return rules_out(_saved(session, lambda: brand.set_rules(session, team, body, actor=principal.actor)))


async def png_body(request: Request) -> bytes:
    if media_type(request.headers.get("content-type")) != "image/png":
        raise APIError(415, "send the logo as Content-Type: image/png", details={"supported": ["image/png"]})
    return await request.body()


@router.put("/logo", response_model=BrandRulesOut, responses=error_responses(*KEYED, *WITH_BODY, 409),
            openapi_extra={"requestBody": {"required": True, "content": {"image/png": {
                "schema": {"type": "string", "format": "binary"}}}}},
            summary="Upload the team's logo (PNG with alpha): stored under its sha256, a new rules version")
def put_logo(
    team: TeamPath, session: SessionDep, principal: AdminDep, data: Annotated[bytes, Depends(png_body)],
    corner: Annotated[Corner | None, Query()] = None,
    scale: Annotated[float | None, Query(ge=0.02, le=0.5)] = None,
    opacity: Annotated[float | None, Query(ge=0.05, le=1.0)] = None,
    margin: Annotated[float | None, Query(ge=0.0, le=0.2)] = None,
    keep_unmarked: Annotated[bool | None, Query()] = None,
) -> BrandRulesOut:
    placement = {name: value for name, value in (("corner", corner), ("scale", scale), ("opacity", opacity),
                                                  ("margin", margin), ("keep_unmarked", keep_unmarked))
                 if value is not None}
    try:
        return rules_out(_saved(session, lambda: brand.upload_logo(session, get_store(), team, data,
                                                                   actor=principal.actor, placement=placement)))
    except brand.LogoError as exc:
        raise APIError(422, str(exc), code="bad_logo") from None


def _saved(session: Session, change: Callable[[], brand.TeamRules]) -> brand.TeamRules:
    """Run a rules change and commit; a concurrent change of the same team is a 409."""
    try:
        rules = change()
        session.commit()
        return rules
    except IntegrityError:
        session.rollback()
        raise APIError(409, "the team's rules changed at the same moment: read them and try again",
                       code="rules_conflict") from None
