"""``instabatch brand show|set|logo``: a team's brand rules and logo, as an admin on the ledger.

Mounted by ``cli/main.py``. The same core functions as ``/v1/teams/{team}/brand-rules`` and
``/logo`` (core/brand.py): every change is a new version and an audit event naming the OS account.
The team ``cli``'s rules apply to ``instabatch run``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from cli.audit import cli_actor

brand_app = typer.Typer(help="A team's brand rules (versioned, audited) and its logo.", no_args_is_help=True)
console = Console()


def _migrated() -> None:
    from core.migrate import upgrade
    from core.settings import get_settings

    if get_settings().uses_sqlite:
        upgrade()


def _print(rules: object) -> None:
    typer.echo(json.dumps({"team": rules.team, "version": rules.version, "created_by": rules.created_by,
                           "rules": rules.rules.model_dump(mode="json")}, indent=2))


@brand_app.command("show")
def show(team: Annotated[str, typer.Argument(help="the team")],
         version: Annotated[Optional[int], typer.Option(help="an earlier version")] = None) -> None:
    """Print the team's rules as JSON (exit 1 when it has none)."""
    from core.brand import current_rules
    from core.db import session_scope

    _migrated()
    with session_scope() as session:
        rules = current_rules(session, team, version)
        if rules is None:
            which = f" version {version}" if version else ""
            console.print(f"[red]error:[/] team {team!r} has no brand rules{which}")
            raise typer.Exit(1)
        _print(rules)


@brand_app.command("set")
def set_rules(team: Annotated[str, typer.Argument(help="the team")],
              file: Annotated[Path, typer.Argument(help="the rules as JSON (the API's BrandRules)", exists=True,
                                                   dir_okay=False)]) -> None:
    """Save FILE as the team's next rules version."""
    from core import brand
    from core.db import session_scope
    from core.storage import get_store

    _migrated()
    try:
        rules = brand.BrandRules.model_validate_json(file.read_text())
    except ValidationError as error:
        console.print(f"[red]error:[/] {file}: {error}", highlight=False)
        raise typer.Exit(2) from None
    if rules.logo is not None and not brand.logo_uploaded(get_store(), rules.logo.sha256):
        console.print(f"[red]error:[/] no logo with sha256 {rules.logo.sha256}: `instabatch brand logo` first")
        raise typer.Exit(2)
    with session_scope() as session:
        _print(brand.set_rules(session, team, rules, actor=cli_actor()))


@brand_app.command("logo")
def logo(
    team: Annotated[str, typer.Argument(help="the team")],
    file: Annotated[Path, typer.Argument(help="a PNG with an alpha channel", exists=True, dir_okay=False)],
    corner: Annotated[Optional[str], typer.Option(help="top-left, top-right, bottom-left, bottom-right")] = None,
    scale: Annotated[Optional[float], typer.Option(help="logo width / image width, 0.02-0.5")] = None,
    opacity: Annotated[Optional[float], typer.Option(help="0.05-1")] = None,
    margin: Annotated[Optional[float], typer.Option(help="gap to the edges / image width, 0-0.2")] = None,
    keep_unmarked: Annotated[Optional[bool], typer.Option("--keep-unmarked/--no-keep-unmarked",
                                                          help="also store each image without the logo")] = None,
) -> None:
    """Upload the team's logo (stored under its sha256) and use it from the next batch on."""
    from core import brand
    from core.db import session_scope
    from core.storage import get_store

    _migrated()
    placement = {name: value for name, value in (("corner", corner), ("scale", scale), ("opacity", opacity),
                                                  ("margin", margin), ("keep_unmarked", keep_unmarked))
                 if value is not None}
    try:
        with session_scope() as session:
            _print(brand.upload_logo(session, get_store(), team, file.read_bytes(), actor=cli_actor(),
                                     placement=placement))
    except (brand.LogoError, ValidationError) as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None
