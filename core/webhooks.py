"""Durable, signed webhooks: deliveries written with their event, signed the Standard Webhooks way.

An event (``batch.completed``, ``batch.failed``, ``image.flagged``, ``item.dead``) adds a
``webhook_deliveries`` row in the transaction that records it, so an event is never lost to a
worker that dies after its commit. The maintenance task (worker/webhooks.py) sends due rows
with exponential backoff; the API lists them and sends one again. Headers follow Standard
Webhooks (https://www.standardwebhooks.com): ``webhook-id`` (the row's id, the same on every
try), ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + HMAC-SHA256 with the team's
``whsec_`` secret; during a rotation's grace period the previous secret signs too).
"""
from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from core import audit
from core.settings import Settings
from core.teams import team_settings
from models import Batch, Item, TeamSettings, WebhookDelivery, utcnow
from models.base import as_utc, new_id

BATCH_COMPLETED = "batch.completed"
BATCH_FAILED = "batch.failed"
IMAGE_FLAGGED = "image.flagged"
ITEM_DEAD = "item.dead"
EVENTS = (BATCH_COMPLETED, BATCH_FAILED, IMAGE_FLAGGED, ITEM_DEAD)
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SECRET_PREFIX = "whsec_"


class UnknownDelivery(LookupError):
    pass


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


# -- events ---------------------------------------------------------------------------------------

def enqueue(session: Session, event: str, *, team: str, batch_id: str | None, url: str | None,
            data: Mapping[str, Any]) -> WebhookDelivery | None:
    """Add the event's delivery in the caller's transaction; None when no endpoint is set."""
    url = url or _team_url(session, team)
    if not url:
        return None
    now = utcnow()
    delivery = WebhookDelivery(
        id=new_id(), team=team, batch_id=batch_id, event=event, url=url, status=PENDING, attempts=0,
        payload={"type": event, "timestamp": now.isoformat(), "data": dict(data)},
        next_attempt_at=now, created_at=now,
    )
    session.add(delivery)
    return delivery


def enqueue_for_batch(session: Session, event: str, batch_id: str, data: Mapping[str, Any],
                      endpoint: tuple[str, str] | None = None) -> WebhookDelivery | None:
    """A batch event to the batch's endpoint (``endpoint``: one ``batch_endpoint`` already looked up)."""
    endpoint = endpoint or batch_endpoint(session, batch_id)
    if endpoint is None:
        return None
    team, url = endpoint
    return enqueue(session, event, team=team, batch_id=batch_id, url=url, data={"batch_id": batch_id, **data})


def batch_endpoint(session: Session, batch_id: str) -> tuple[str, str] | None:
    """(team, url) a batch's events go to, or None when nowhere: looked up once for many events
    (the worker's image.flagged deliveries of a micro-batch)."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return None
    url = batch.webhook_url or _team_url(session, batch.team)
    return (batch.team, url) if url else None


def enqueue_items_dead(session: Session, item_ids: Sequence[str]) -> int:
    """One ``item.dead`` per item, in the caller's transaction (the one that made them dead)."""
    if not item_ids:
        return 0
    rows = session.execute(select(Item.id, Item.batch_id, Item.external_id, Item.attempts, Item.error)
                           .where(Item.id.in_(list(item_ids)))).all()
    for item_id, batch_id, external_id, attempts, error in rows:
        enqueue_for_batch(session, ITEM_DEAD, batch_id, {
            "item_id": item_id, "external_id": external_id, "attempts": attempts, "error": error})
    return len(rows)


def _team_url(session: Session, team: str) -> str | None:
    row = team_settings(session, team)
    return row.webhook_url if row else None


# -- secrets --------------------------------------------------------------------------------------

def rotate_secret(session: Session, team: str, *, actor: str) -> str:
    """A new secret for the team; the old one keeps signing for the grace period. The caller commits."""
    row = team_settings(session, team, create=True)
    row.previous_webhook_secret = row.webhook_secret
    row.webhook_secret = new_secret()
    row.webhook_secret_rotated_at = row.updated_at = utcnow()
    audit.record(session, "webhook.secret_rotated", actor=actor, payload={"team": team})
    return row.webhook_secret


def set_team_url(session: Session, team: str, url: str | None, *, actor: str) -> TeamSettings:
    row = team_settings(session, team, create=True)
    row.webhook_url = url
    row.updated_at = utcnow()
    audit.record(session, "webhook.url_changed", actor=actor, payload={"team": team, "url": url})
    return row


def signing_secrets(session: Session, team: str, settings: Settings, now: datetime) -> list[str]:
    """The team's current secret (made on first use), then the previous one during its grace period."""
    row = team_settings(session, team, create=True)
    if not row.webhook_secret:
        row.webhook_secret = new_secret()
        row.updated_at = now
    found = [row.webhook_secret]
    rotated = row.webhook_secret_rotated_at
    grace = timedelta(seconds=settings.webhook_secret_grace_seconds)
    if row.previous_webhook_secret and rotated is not None and as_utc(rotated) + grace > now:
        found.append(row.previous_webhook_secret)
    return found


@dataclass(frozen=True)
class SignedRequest:
    body: bytes
    headers: dict[str, str]


def signed_request(delivery_id: str, payload: Mapping[str, Any], secrets_: Iterable[str], now: datetime) -> SignedRequest:
    """The body and the Standard Webhooks headers; one ``v1,`` signature per secret."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    signatures = " ".join(Webhook(secret).sign(delivery_id, now, body) for secret in secrets_)
    return SignedRequest(body.encode(), {
        "content-type": "application/json", "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signatures,
    })


# -- the delivery schedule -----------------------------------------------------------------------

def backoff_seconds(attempts: int, settings: Settings) -> float:
    """Exponential from WEBHOOK_BACKOFF_SECONDS after the first failure, capped."""
    return min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * 2 ** max(attempts - 1, 0))


def claim_due(session: Session, settings: Settings, now: datetime, limit: int = 10) -> list[WebhookDelivery]:
    """Due pending deliveries, pushed ahead by as long as sending them all can take, so that a
    second sender skips them (and a sender that dies leaves them due again). The caller commits
    before sending."""
    lease = timedelta(seconds=settings.webhook_timeout_seconds * (limit + 1))
    due = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    for delivery in due:
        delivery.next_attempt_at = now + lease
    return list(due)


def record_attempt(session: Session, delivery_id: str, settings: Settings, now: datetime, *,
                   status_code: int | None, error: str | None, permanent: bool = False) -> str:
    """Record one try: delivered on a 2xx, else due again after the backoff, or failed for good."""
    delivery = session.get(WebhookDelivery, delivery_id)
    delivery.attempts += 1
    delivery.last_attempt_at = now
    delivery.last_status_code = status_code
    delivery.last_error = error
    if error is None:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = DELIVERED, now, None
    elif permanent or delivery.attempts >= settings.webhook_max_attempts:
        delivery.status, delivery.next_attempt_at = FAILED, None
    else:
        delivery.next_attempt_at = now + timedelta(seconds=backoff_seconds(delivery.attempts, settings))
    return delivery.status


def resend(session: Session, delivery_id: str, *, actor: str, teams: Iterable[str] | None = None) -> WebhookDelivery:
    """Send a delivery again now (delivered or failed ones included), with a fresh attempt budget."""
    query = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
    if teams is not None:
        query = query.where(WebhookDelivery.team.in_(list(teams)))
    delivery = session.scalar(query)
    if delivery is None:
        raise UnknownDelivery(delivery_id)
    delivery.status, delivery.attempts, delivery.next_attempt_at = PENDING, 0, utcnow()
    audit.record(session, "webhook.resend", actor=actor, batch_id=delivery.batch_id,
                 payload={"delivery_id": delivery.id, "event": delivery.event})
    return delivery
