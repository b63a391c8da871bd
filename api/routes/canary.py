"""A team's canary roll-out (docs/models.md, "Canary roll-out"): admins start, promote and roll back;
whoever sees the team reads it, with the QC verdicts per model so far. Each change is an audit event,
written by core/canary.py."""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import AdminDep, ReaderDep, SessionDep, require_json_body
from api.errors import KEYED, WITH_BODY, APIError, error_responses, not_found
from api.schemas.canary import CanaryOut, CanaryStart, TeamCanaryOut
from core import canary
from core.keys import MAX_TEAM_CHARS

router = APIRouter(prefix="/teams/{team}/canary", tags=["canary"])
TeamPath = Annotated[str, Path(min_length=1, max_length=MAX_TEAM_CHARS, pattern=r"^[^\x00/]+$")]
NO_CANARY = {404: "the team has no active canary (or it is another team's)"}


def team_canary(session: Session, team: str) -> TeamCanaryOut:
    rows = canary.canaries(session, team)
    active = next((row for row in rows if row.state == canary.ACTIVE), None)
    return TeamCanaryOut(
        team=team, default_model=canary.team_default_model(session, team),
        active=CanaryOut.model_validate(canary.status(session, active)) if active else None,
        history=[CanaryOut.model_validate(canary.status(session, row)) for row in rows if row is not active])


@router.get("", response_model=TeamCanaryOut, responses=error_responses(*KEYED, 404, meanings={
    404: "another team's"}), summary="The team's canary, its history and QC verdicts per model")
def get_canary(team: TeamPath, session: SessionDep, principal: ReaderDep) -> TeamCanaryOut:
    if not principal.can_see_team(team):  # another team's settings are 404, like its batches
        raise not_found("team")
    return team_canary(session, team)


@router.put("", response_model=TeamCanaryOut, dependencies=[Depends(require_json_body)],
            responses=error_responses(*KEYED, *WITH_BODY, 409, meanings={409: "the team has an active canary"}),
            summary="Start a canary: this fraction of the team's items runs the candidate model; audited")
def start_canary(team: TeamPath, body: CanaryStart, session: SessionDep, principal: AdminDep) -> TeamCanaryOut:
    return _changed(session, team, lambda: canary.start(session, team, body.model, body.fraction,
                                                        actor=principal.actor))


@router.post("/promote", response_model=TeamCanaryOut, responses=error_responses(*KEYED, 404, meanings=NO_CANARY),
             summary="Promote the candidate to the team's default model and end the canary; audited")
def promote_canary(team: TeamPath, session: SessionDep, principal: AdminDep) -> TeamCanaryOut:
    return _changed(session, team, lambda: canary.promote(session, team, actor=principal.actor))


@router.post("/rollback", response_model=TeamCanaryOut, responses=error_responses(*KEYED, 404, meanings=NO_CANARY),
             summary="End the canary: its queued items and later batches run the default model; audited")
def rollback_canary(team: TeamPath, session: SessionDep, principal: AdminDep) -> TeamCanaryOut:
    return _changed(session, team, lambda: canary.rollback(session, team, actor=principal.actor))


def _changed(session: Session, team: str, change: Callable[[], object]) -> TeamCanaryOut:
    """Run a change and commit; a conflict (two admins at once included) is a 409, a bad candidate a 422."""
    try:
        change()
        session.commit()
    except canary.NoActiveCanary as exc:
        session.rollback()
        raise APIError(404, str(exc), code=exc.code) from None
    except canary.CanaryConflict as exc:
        session.rollback()
        raise APIError(409, str(exc), code=exc.code) from None
    except canary.CanaryError as exc:
        session.rollback()
        detail = {"field": f"body.{exc.field}", "loc": ["body", exc.field], "message": str(exc), "type": "value_error"}
        raise APIError(422, "the canary is not valid", code=exc.code, details=[detail]) from None
    except IntegrityError:
        session.rollback()
        raise APIError(409, f"team {team!r} started a canary at the same moment: read it and try again",
                       code="canary_active") from None
    return team_canary(session, team)
