"""Per-team settings: quota overrides and the webhook endpoint and secret (models.TeamSettings)."""
from __future__ import annotations

from sqlalchemy.orm import Session

from models import TeamSettings, utcnow


def team_settings(session: Session, team: str, *, create: bool = False) -> TeamSettings | None:
    """The team's row; with ``create``, an empty one (every field its default) when it has none."""
    row = session.get(TeamSettings, team)
    if row is None and create:
        row = TeamSettings(team=team, updated_at=utcnow())
        session.add(row)
        session.flush()
    return row
