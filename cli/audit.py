"""``instabatch audit verify|export|anchor``.

Mounted by ``cli/main.py``: ``app.add_typer(audit_app, name="audit")``.

Every command ends with one ``RESULT key=value ...`` line; exit status 0 when all is well, 1 when
the chain, an anchor or a file does not check out, 2 when something needed cannot be reached.
"""
from __future__ import annotations

import getpass
import socket
import sys
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO, Iterator

import typer

from core.audit.anchors import ChainBroken, anchor_chain, load_anchors
from core.audit.export import EventFilter, record_export, stream_export
from core.audit.verify import VerifyResult, verify_chain, verify_export
from core.db import get_engine, session_scope
from core.storage import get_store

audit_app = typer.Typer(help="The tamper-evident audit trail: verify it, export it, anchor its head.",
                        no_args_is_help=True)

UNREACHABLE = 2


class Format(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    JSON = "json"


def cli_actor() -> str:
    """How the audit trail names a CLI user: there is no API key, so the OS account and host."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def fail(message: str, code: int = UNREACHABLE) -> typer.Exit:
    typer.echo(f"ERROR {message}", err=True)
    return typer.Exit(code)


# -- verify ------------------------------------------------------------------------------------

@audit_app.command()
def verify(
    file: Annotated[Path | None, typer.Option("--file", help="verify a complete JSON Lines export "
                                                              "instead of the ledger", exists=True)] = None,
    anchors: Annotated[bool, typer.Option(help="check the anchors in object storage")] = True,
) -> None:
    """Recompute the hash chain; report every edited, deleted, inserted or reordered event."""
    known = _load_anchors() if anchors else None
    if file is not None:
        with file.open("rb") as lines:
            result = verify_export(lines, known)
    else:
        result = verify_chain(get_engine(), known)
    _print_result(result)
    raise typer.Exit(0 if result.ok else 1)


def _load_anchors() -> dict[int, str]:
    try:
        return load_anchors(get_store())
    except Exception as exc:  # noqa: BLE001 - unreadable anchors must not pass silently
        raise fail(f"cannot read the chain anchors from object storage ({exc}); "
                   "pass --no-anchors to verify the chain alone") from None


def _print_result(result: VerifyResult) -> None:
    for problem in result.problems:
        span = f"..{problem.last_seq}" if problem.last_seq not in (None, problem.seq) else ""
        typer.echo(f"PROBLEM seq={problem.seq}{span} kind={problem.kind} {problem.detail}")
    if result.problems_total > len(result.problems):
        typer.echo(f"... and {result.problems_total - len(result.problems)} more problems")
    rate = result.events / result.seconds if result.seconds > 0 else 0.0
    typer.echo(f"{result.summary()} seconds={result.seconds:.2f} events_per_s={rate:.0f}")


# -- export ------------------------------------------------------------------------------------

@audit_app.command()
def export(
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.JSONL,
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write; '-' for stdout")] = Path("-"),
    since: Annotated[datetime | None, typer.Option(help="events at or after (UTC unless a zone is given)")] = None,
    until: Annotated[datetime | None, typer.Option(help="events before")] = None,
    batch_id: Annotated[str | None, typer.Option("--batch-id")] = None,
    actor: Annotated[str | None, typer.Option()] = None,
    action: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Stream the matching events to a file in constant memory; the export is itself audited."""
    event_filter = EventFilter(since=since, until=until, batch_id=batch_id, actor=actor, action=action)
    with session_scope() as session:
        bounded = record_export(session, actor=cli_actor(), fmt=format.value, event_filter=event_filter)
    written = 0
    with _output(out) as sink:
        for chunk in stream_export(get_engine(), bounded, format.value):
            sink.write(chunk)
            written += len(chunk)
    typer.echo(f"RESULT exported=true format={format.value} through_seq={bounded.through_seq} "
               f"bytes={written} out={out}", err=str(out) == "-")


@contextmanager
def _output(out: Path) -> Iterator[BinaryIO]:
    if str(out) == "-":
        yield sys.stdout.buffer
        sys.stdout.flush()
        return
    with out.open("wb") as sink:
        yield sink


# -- anchor ------------------------------------------------------------------------------------

@audit_app.command()
def anchor() -> None:
    """Write the chain head to write-once object storage now (the beat task does it periodically)."""
    try:
        with session_scope() as session:
            result = anchor_chain(session, get_store())
    except ChainBroken as broken:
        _print_result(broken.result)
        typer.echo("RESULT anchored=false reason=chain-broken-since-last-anchor")
        raise typer.Exit(1) from None
    if result is None:
        typer.echo("RESULT anchored=false reason=empty-chain")
        return
    typer.echo(f"RESULT anchored=true created={str(result.created).lower()} seq={result.anchor.seq} "
               f"hash={result.anchor.hash} key={result.anchor.key}")
