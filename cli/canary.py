"""``instabatch canary start|status|promote|rollback``: a team's canary roll-out, for an admin at the
ledger (docs/models.md, "Canary roll-out"). The same core functions as ``/v1/teams/{team}/canary``
(core/canary.py): every change is an audit event naming the OS account, the team, both models and
the fraction."""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from cli.audit import cli_actor, fail

canary_app = typer.Typer(help="Send a fraction of a team's items to a candidate model; compare, promote or "
                              "roll back (audited).", no_args_is_help=True)
INVALID = 2


def _migrated() -> None:
    from core.migrate import upgrade
    from core.settings import get_settings

    if get_settings().uses_sqlite:
        upgrade()


def _print(status: dict[str, Any]) -> None:
    ended = f", ended by {status['ended_by']}" if status["ended_by"] else ""
    typer.echo(f"canary {status['id']}\tteam {status['team']}\t{status['state']}\t{status['model']} on "
               f"{status['fraction']:g} of items (default {status['base_model']})\t{status['batches']} batches\t"
               f"started by {status['started_by']}{ended}")
    if status["by_model"]:
        typer.echo("  model\timages\tpass\treview\treject\tpass_rate\treview_rate\treject_rate")
    for row in status["by_model"]:
        typer.echo(f"  {row['model']}\t{row['images']}\t{row['pass']}\t{row['review']}\t{row['reject']}\t"
                   f"{row['pass_rate']:.4f}\t{row['review_rate']:.4f}\t{row['reject_rate']:.4f}")


def _change(change: Any) -> None:
    """Run an audited change in one transaction and print the canary after it; a refusal exits 2."""
    from core import canary
    from core.db import session_scope

    _migrated()
    try:
        with session_scope() as session:
            row = change(session, canary)
            _print(canary.status(session, row))
    except canary.CanaryError as error:
        raise fail(str(error), INVALID) from None


@canary_app.command("start")
def start(team: Annotated[str, typer.Argument(help="the team")],
          model: Annotated[str, typer.Option(help="the candidate: a registry name (instaflow/weights/models.toml)")],
          fraction: Annotated[float, typer.Option(help="share of each batch's items for the candidate, up to 0.5")],
          ) -> None:
    """Start sending FRACTION of TEAM's items to MODEL."""
    _change(lambda session, canary: canary.start(session, team, model, fraction, actor=cli_actor()))


@canary_app.command("status")
def status(team: Annotated[Optional[str], typer.Argument(help="one team (default: every team's)")] = None,
           all_: Annotated[bool, typer.Option("--all", help="ended canaries too")] = False) -> None:
    """Canaries with the QC verdicts per model over their batches (active ones unless --all)."""
    from core import canary
    from core.db import session_scope

    _migrated()
    with session_scope() as session:
        rows = [row for row in canary.canaries(session, team) if all_ or row.state == canary.ACTIVE]
        if team:
            typer.echo(f"team {team}\tdefault model {canary.team_default_model(session, team)}")
        if not rows:
            typer.echo("no active canary" if not all_ else "no canaries")
        for row in rows:
            _print(canary.status(session, row))


@canary_app.command("promote")
def promote(team: Annotated[str, typer.Argument(help="the team")]) -> None:
    """Make the candidate TEAM's default model and end the canary."""
    _change(lambda session, canary: canary.promote(session, team, actor=cli_actor()))


@canary_app.command("rollback")
def rollback(team: Annotated[str, typer.Argument(help="the team")]) -> None:
    """End the canary: its queued items and later batches run the default model."""
    _change(lambda session, canary: canary.rollback(session, team, actor=cli_actor()))
