"""Team limits and webhook settings (docs/quotas.md, docs/webhooks.md), and webhook deliveries.

An admin changes any team's limits and webhook settings; a team's own submitters read them,
set the team's webhook URL and rotate its secret (they need it to verify signatures). Every
change is an audit event, written by core/.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from api import queries
from api.deps import AdminDep, PrincipalDep, SessionDep, SubmitterDep, looks_like_id, require_json_body
from api.errors import KEYED, WITH_BODY, error_responses, not_found
from api.schemas.teams import (
    DeliveryOut,
    DeliveryPage,
    DeliveryStatus,
    LimitsOut,
    LimitsUpdate,
    WebhookSecret,
    WebhookSettingsOut,
    WebhookSettingsUpdate,
)
from core import quotas, webhooks
from core.keys import MAX_TEAM_CHARS, Principal
from core.settings import get_settings
from models import Role

router = APIRouter(tags=["teams"])
TEAM_ERRORS = error_responses(*KEYED, 404, meanings={404: "no such team (or another team's)"})
TEAM_WRITE_ERRORS = error_responses(*KEYED, *WITH_BODY, 404, meanings={404: "no such team (or another team's)"})
WRITE_ERRORS = error_responses(*KEYED, *WITH_BODY)
TeamPath = Annotated[str, Path(min_length=1, max_length=MAX_TEAM_CHARS, pattern=r"^[^\x00]+$")]


def own_team_or_admin(principal: Principal, team: str) -> None:
    """Another team's settings are 404, like its batches, so their existence does not leak."""
    if principal.role != Role.ADMIN and principal.team != team:
        raise not_found("team")


@router.get("/teams/{team}/limits", response_model=LimitsOut, responses=TEAM_ERRORS, summary="A team's quotas and what it has queued")
def get_limits(team: TeamPath, session: SessionDep, principal: PrincipalDep) -> LimitsOut:
    if not principal.can_see_team(team):
        raise not_found("team")
    return queries.team_limits(session, team)


@router.patch("/teams/{team}/limits", response_model=LimitsOut, responses=WRITE_ERRORS, dependencies=[Depends(require_json_body)],
              summary="Override a team's quotas (null: back to the default; 0: no limit); audited")
def set_limits(team: TeamPath, body: LimitsUpdate, session: SessionDep, principal: AdminDep) -> LimitsOut:
    quotas.set_limits(session, team, body.model_dump(exclude_unset=True), actor=principal.actor,
                      settings=get_settings())
    session.commit()
    return queries.team_limits(session, team)


@router.get("/teams/{team}/webhook", response_model=WebhookSettingsOut, responses=TEAM_ERRORS, summary="A team's webhook endpoint")
def get_webhook(team: TeamPath, session: SessionDep, principal: SubmitterDep) -> WebhookSettingsOut:
    own_team_or_admin(principal, team)
    return queries.webhook_settings(session, team)


@router.put("/teams/{team}/webhook", response_model=WebhookSettingsOut, responses=TEAM_WRITE_ERRORS, dependencies=[Depends(require_json_body)],
            summary="Set the team's webhook endpoint (used when a batch names none); audited")
def set_webhook(team: TeamPath, body: WebhookSettingsUpdate, session: SessionDep,
                principal: SubmitterDep) -> WebhookSettingsOut:
    own_team_or_admin(principal, team)
    webhooks.set_team_url(session, team, str(body.url) if body.url else None, actor=principal.actor)
    session.commit()
    return queries.webhook_settings(session, team)


@router.post("/teams/{team}/webhook/rotate-secret", response_model=WebhookSecret, responses=TEAM_ERRORS,
             summary="A new signing secret, shown once; the previous one also signs for a grace period")
def rotate_secret(team: TeamPath, session: SessionDep, principal: SubmitterDep) -> WebhookSecret:
    own_team_or_admin(principal, team)
    secret = webhooks.rotate_secret(session, team, actor=principal.actor)
    session.commit()
    return WebhookSecret(team=team, secret=secret)


@router.get("/webhooks/deliveries", response_model=DeliveryPage, responses=error_responses(*KEYED), summary="Webhook deliveries, newest first")
def list_deliveries(
    session: SessionDep, principal: SubmitterDep,
    batch_id: Annotated[str | None, Query(max_length=36)] = None,
    status: Annotated[DeliveryStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> DeliveryPage:
    return queries.page_deliveries(session, principal, limit=limit, cursor=cursor, batch_id=batch_id, status=status)


@router.post("/webhooks/deliveries/{delivery_id}/resend", response_model=DeliveryOut,
             responses=error_responses(*KEYED, 404, meanings={404: "no such delivery (or another team's)"}),
             summary="Send a delivery again now, with a fresh attempt budget; audited")
def resend_delivery(delivery_id: str, session: SessionDep, principal: SubmitterDep) -> DeliveryOut:
    if not looks_like_id(delivery_id):
        raise not_found("delivery")
    teams = None if principal.sees_all_teams else [principal.team]
    try:
        delivery = webhooks.resend(session, delivery_id, actor=principal.actor, teams=teams)
    except webhooks.UnknownDelivery:
        raise not_found("delivery") from None
    session.commit()
    return DeliveryOut.model_validate(delivery)
