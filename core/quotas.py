"""Quotas per team: images queued at once and submissions per minute (docs/quotas.md).

Defaults come from the settings (QUOTA_*); an admin overrides them per team in
``team_settings`` through the API or the CLI, each change an audit event. A limit of 0 turns it
off. The submission rate is a moving window kept by the ``limits`` library in Redis (the broker,
by default), so every API process shares one count; the embedded setup keeps it in memory. When
that Redis does not answer, the rate is not checked (fail open, logged).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from limits import RateLimitItemPerMinute, storage, strategies
from limits.errors import StorageError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import audit
from core.settings import Settings
from core.teams import team_settings
from models import Batch, Item, ItemState, utcnow

log = logging.getLogger(__name__)
LIMIT_FIELDS = ("max_queued_images", "submissions_per_minute")
RATE_NAMESPACE = "instabatch-submissions"
STORAGE_TIMEOUT_S = 1.0  # a Redis that does not answer must not hold a submission


class QuotaExceeded(Exception):
    """A team is over one of its limits; ``retry_after`` seconds is when trying again makes sense."""

    def __init__(self, code: str, message: str, retry_after: int, details: dict[str, Any]):
        super().__init__(message)
        self.code, self.message, self.retry_after, self.details = code, message, retry_after, details


@dataclass(frozen=True)
class TeamLimits:
    team: str
    max_queued_images: int
    submissions_per_minute: int
    overrides: dict[str, int]  # only the fields this team overrides


def limits_for(session: Session, team: str, settings: Settings) -> TeamLimits:
    row = team_settings(session, team)
    overrides = {name: getattr(row, name) for name in LIMIT_FIELDS if row and getattr(row, name) is not None}
    defaults = {"max_queued_images": settings.quota_max_queued_images,
                "submissions_per_minute": settings.quota_submissions_per_minute}
    return TeamLimits(team=team, overrides=overrides, **{**defaults, **overrides})


def set_limits(session: Session, team: str, changes: dict[str, int | None], *, actor: str,
               settings: Settings) -> TeamLimits:
    """Override (a number) or reset to the default (None) the named limits; audited. The caller commits."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    before = limits_for(session, team, settings)
    row = team_settings(session, team, create=True)
    for name, value in changes.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} must be 0 (no limit) or more")
        setattr(row, name, value)
    row.updated_at = utcnow()
    after = limits_for(session, team, settings)
    audit.record(session, "team.limits_changed", actor=actor, payload={
        "team": team, "changes": changes, "before": before.overrides, "after": after.overrides})
    return after


def queued_images(session: Session, team: str) -> int:
    """Images of the team's queued or running items (ix_items_batch_state serves the count)."""
    return session.scalar(select(func.coalesce(func.sum(Item.num_images), 0))
                          .join(Batch, Batch.id == Item.batch_id)
                          .where(Batch.team == team, Item.state.in_(ItemState.active()))) or 0


def check_queued_images(session: Session, team: str, new_images: int, settings: Settings) -> None:
    """Raise :class:`QuotaExceeded` when the new batch would put the team over its queued images."""
    limit = limits_for(session, team, settings).max_queued_images
    if not limit:
        return
    queued = queued_images(session, team)
    if queued + new_images > limit:
        raise QuotaExceeded(
            "queued_images_quota", f"team {team!r} may have {limit} images queued; it has {queued} "
            f"and this batch adds {new_images}", settings.quota_retry_after_seconds,
            {"limit": limit, "queued": queued, "requested": new_images,
             "retry_after_s": settings.quota_retry_after_seconds})


def admit_submission(session: Session, team: str, images: int, settings: Settings) -> None:
    """Both limits, for a new submission (an Idempotency-Key replay is not one); raises QuotaExceeded."""
    hit_submission_rate(session, team, settings)
    check_queued_images(session, team, images, settings)


def hit_submission_rate(session: Session, team: str, settings: Settings) -> None:
    """Count one submission in the team's moving minute; raise :class:`QuotaExceeded` over the limit."""
    per_minute = limits_for(session, team, settings).submissions_per_minute
    if not per_minute:
        return
    item = RateLimitItemPerMinute(per_minute, namespace=RATE_NAMESPACE)
    limiter = rate_limiter(settings.rate_limit_storage_url)
    try:
        if limiter.hit(item, team):
            return
        reset_at = limiter.get_window_stats(item, team).reset_time
    except StorageError as error:
        # Fail open: a submission is accepted while the broker is down (its chunks wait in the
        # outbox), and the rate limit must not be what refuses it.
        log.warning("submission rate of team %s not checked: %s", team, error)
        return
    retry_after = max(1, math.ceil(reset_at - time.time()))
    raise QuotaExceeded(
        "rate_limited", f"team {team!r} may submit {per_minute} batches a minute", retry_after,
        {"limit_per_minute": per_minute, "retry_after_s": retry_after})


@lru_cache(maxsize=4)
def rate_limiter(storage_url: str) -> strategies.MovingWindowRateLimiter:
    options = {} if storage_url.startswith("memory") else {
        "wrap_exceptions": True, "socket_timeout": STORAGE_TIMEOUT_S, "socket_connect_timeout": STORAGE_TIMEOUT_S}
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_url, **options))
