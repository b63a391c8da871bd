"""``instabatch teams``: a team's quotas and webhook secret, for an admin at the ledger (audited)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.audit import cli_actor

teams_app = typer.Typer(help="Team quotas and webhook secrets (docs/quotas.md, docs/webhooks.md).",
                        no_args_is_help=True)
DEFAULT = "default"


def limit_value(text: str | None) -> int | None:
    """``default`` puts the setting's default back; a number overrides it (0: no limit)."""
    if text is None or text == DEFAULT:
        return None
    if not text.isdigit():
        raise typer.BadParameter(f"a number of 0 or more, or {DEFAULT!r}")
    return int(text)


@teams_app.command("limits")
def limits(
    team: Annotated[str, typer.Argument(help="the team")],
    max_queued_images: Annotated[Optional[str], typer.Option(
        help="images queued or running at once (0: no limit; 'default': the setting)")] = None,
    submissions_per_minute: Annotated[Optional[str], typer.Option(
        help="batches a minute (0: no limit; 'default': the setting)")] = None,
) -> None:
    """Show a team's limits; with options, change them first (an audit event)."""
    from core import quotas
    from core.db import session_scope
    from core.settings import get_settings

    changes = {name: limit_value(value) for name, value in
               (("max_queued_images", max_queued_images), ("submissions_per_minute", submissions_per_minute))
               if value is not None}
    settings = get_settings()
    with session_scope() as session:
        if changes:
            quotas.set_limits(session, team, changes, actor=cli_actor(), settings=settings)
        current = quotas.limits_for(session, team, settings)
        queued = quotas.queued_images(session, team)
    for name in quotas.LIMIT_FIELDS:
        origin = "override" if name in current.overrides else "default"
        typer.echo(f"{name}\t{getattr(current, name)}\t{origin}")
    typer.echo(f"queued_images\t{queued}")


@teams_app.command("rotate-webhook-secret")
def rotate_webhook_secret(team: Annotated[str, typer.Argument(help="the team")]) -> None:
    """A new signing secret, printed once; the previous one keeps signing for the grace period."""
    from core import webhooks
    from core.db import session_scope

    with session_scope() as session:
        secret = webhooks.rotate_secret(session, team, actor=cli_actor())
    typer.echo(secret)
