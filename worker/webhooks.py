"""Sends due webhook deliveries: the maintenance task's side of core/webhooks.py.

Beat runs :func:`deliver_due` on the maintenance queue, never inside a GPU task: a slow receiver
cannot hold a chunk. Each delivery is signed at send time with the team's current secret(s) and
POSTed to its URL, refused for internal addresses unless WEBHOOK_ALLOW_PRIVATE.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from core import webhooks
from core.settings import Settings
from models import utcnow

log = logging.getLogger(__name__)


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, status: str, delivery_id: str) -> None:
        if status == webhooks.DELIVERED:
            self.delivered.append(delivery_id)
        elif status == webhooks.FAILED:
            self.failed.append(delivery_id)
        else:
            self.retrying.append(delivery_id)


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    error: str | None
    permanent: bool = False


def deliver_due(sessions: sessionmaker[Session], settings: Settings) -> DeliveryReport:
    """Send every due delivery once and record each outcome."""
    report = DeliveryReport()
    now = utcnow()
    with sessions() as session:
        due = [(d.id, d.team, d.url, d.payload) for d in webhooks.claim_due(session, settings, now)]
        signed = {team: webhooks.signing_secrets(session, team, settings, now) for team in {d[1] for d in due}}
        session.commit()
    for delivery_id, team, url, payload in due:
        attempt = post_signed(url, webhooks.signed_request(delivery_id, payload, signed[team], utcnow()), settings)
        with sessions() as session:
            status = webhooks.record_attempt(session, delivery_id, settings, utcnow(), status_code=attempt.status_code,
                                             error=attempt.error, permanent=attempt.permanent)
            session.commit()
        report.add(status, delivery_id)
        if attempt.error:
            log.warning("webhook %s to %s: %s (%s)", delivery_id, url, attempt.error, status)
    return report


def post_signed(url: str, request: webhooks.SignedRequest, settings: Settings) -> Attempt:
    """One POST; any failure of someone else's server is an outcome to record, never an exception."""
    try:
        if not settings.webhook_allow_private:
            refuse_internal_address(url)
        response = httpx.post(url, content=request.body, headers=request.headers,
                              timeout=settings.webhook_timeout_seconds, follow_redirects=False)
    except InternalAddressRefused as error:
        return Attempt(None, str(error), permanent=True)
    except httpx.HTTPError as error:
        return Attempt(None, f"{type(error).__name__}: {error}"[:500])
    if response.is_success:
        return Attempt(response.status_code, None)
    return Attempt(response.status_code, f"HTTP {response.status_code}")


class InternalAddressRefused(ValueError):
    pass


def refuse_internal_address(url: str) -> None:
    """Raise when the URL's host resolves to a loopback, private, link-local or reserved address.

    Checked just before the POST (redirects are not followed); a host whose DNS answer changes
    between this check and the connection is not caught: front the workers with an egress proxy
    where that matters."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise InternalAddressRefused(f"cannot resolve {host!r}: {error}") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global:
            raise InternalAddressRefused(f"{host} resolves to {ip}, an internal address (WEBHOOK_ALLOW_PRIVATE)")
