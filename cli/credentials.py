"""``instabatch credentials init | verify``: the signing chain, and checking any file's credentials.

``verify FILE…`` prints, per file, the C2PA manifest's state (valid, signer, trusted against
C2PA_TRUST_ANCHORS or not, AI-generated), the watermark and the ledger's image it maps to, then
one ``RESULT`` line. Exit 0 when every file is accounted for (a valid manifest, or a watermark or
sha256 the ledger knows), 1 when one is not, 2 when the ledger cannot be reached.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.audit import fail
from cli.provenance import _ledger_configured
from core import credentials
from core.db import session_scope
from core.settings import Settings, get_settings
from core.verification import UnreadableImage, Verification, trust_anchors, verify

credentials_app = typer.Typer(help="Content Credentials: the signing chain, and verifying files", no_args_is_help=True)


@credentials_app.command("init")
def init(folder: Annotated[Path | None, typer.Option(
        "--dir", help="where to write it (default: INSTABATCH_VAR_DIR/credentials)")] = None) -> None:
    """Make a self-signed development chain (ES256). It is UNTRUSTED: no C2PA reader trusts it."""
    target = (folder or credentials.dev_chain_folder(get_settings())).resolve()
    created = credentials.create_dev_chain(target)
    typer.echo(f"{'created' if created else 'kept the existing'} development signing chain in {target}")
    typer.echo("It is UNTRUSTED: self-signed, for development and demos only. Readers report its "
               "signatures as valid but the signer as untrusted. Production needs a key and chain from a "
               "C2PA-recognised certificate authority.")
    typer.echo(f"  C2PA_SIGNING_KEY={target / credentials.KEY_FILE}")
    typer.echo(f"  C2PA_SIGNING_CHAIN={target / credentials.CHAIN_FILE}")
    typer.echo(f"  C2PA_TRUST_ANCHORS={target / credentials.ROOT_FILE}   # only to trust it on this machine")


def announce_signing(settings: Settings, console: Console) -> None:
    """``instabatch run`` says which chain signs; in dev mode without a key it makes the dev chain first."""
    if settings.c2pa_signing_key or settings.credentials_mode == "required":
        return
    folder = credentials.dev_chain_folder(settings)
    created = credentials.create_dev_chain(folder)
    console.print(f"[yellow]Content Credentials are signed with an UNTRUSTED development chain in {folder}"
                  f"{' (created now)' if created else ''}; set C2PA_SIGNING_KEY / C2PA_SIGNING_CHAIN for a real one[/]",
                  highlight=False, soft_wrap=True)


@credentials_app.command("verify")
def verify_files(
    files: Annotated[list[Path], typer.Argument(help="images to check", exists=True, dir_okay=False)],
    ledger: Annotated[bool | None, typer.Option(
        "--ledger/--no-ledger", help="look the files up in the ledger (default: when one is configured)")] = None,
) -> None:
    """The C2PA manifest, the watermark and the ledger's record of each file."""
    settings = get_settings()
    anchors = trust_anchors(settings)
    use_ledger = ledger if ledger is not None else _ledger_configured()
    accounted = 0
    for file in files:
        try:
            report = _verify_one(file.read_bytes(), anchors, use_ledger)
        except UnreadableImage as exc:
            typer.echo(f"FILE {file} {exc}")
            continue
        print_report(file, report, use_ledger)
        accounted += bool(report.manifest.valid or report.matches)
    typer.echo(f"RESULT files={len(files)} accounted={accounted} ledger={'checked' if use_ledger else 'unchecked'}")
    raise typer.Exit(0 if accounted == len(files) else 1)


def _verify_one(data: bytes, anchors: bytes | None, use_ledger: bool) -> Verification:
    if not use_ledger:
        return verify(data, anchors=anchors)
    try:
        with session_scope() as session:
            return verify(data, anchors=anchors, session=session)
    except UnreadableImage:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable ledger is not a verdict on the file
        raise fail(f"cannot read the ledger ({type(exc).__name__}: {exc})") from None


def print_report(file: Path, report: Verification, use_ledger: bool) -> None:
    manifest = report.manifest
    typer.echo(f"FILE {file} sha256={report.sha256} {report.format or '?'} {report.width}x{report.height}")
    if not manifest.present:
        typer.echo(f"  manifest: none{f' ({manifest.error})' if manifest.error else ''}")
    else:
        typer.echo(f"  manifest: {manifest.state} ai_generated={str(manifest.ai_generated).lower()} "
                   f"signer={manifest.signer!r} trusted={str(manifest.trusted).lower()}")
        for code in manifest.failures:
            typer.echo(f"  manifest failure: {code}")
    if use_ledger:
        found = report.watermark_id or ("none known to the ledger" if report.watermark_checked else "image too small")
        typer.echo(f"  watermark: {found}")
    for match in report.matches:
        typer.echo(f"  ledger ({match.found_by}): image={match.image_id} item={match.item_id} "
                   f"external_id={match.external_id} batch={match.batch_id} ({match.batch_name}, team {match.team}) "
                   f"model={match.model_id} qc={match.qc_verdict} review={match.review_status or '-'} "
                   f"same_file={str(match.same_file).lower()}")
    if use_ledger and not report.matches:
        typer.echo("  ledger: no image found")
