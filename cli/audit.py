"""``instabatch audit verify|export|anchor`` and ``instabatch provenance FILE.png``.

Mounted by ``cli/main.py``::

    app.add_typer(audit_app, name="audit")
    app.command("provenance")(provenance)

Every command ends with one ``RESULT key=value ...`` line; exit status 0 when all is well, 1 when
the chain, an anchor or a file does not check out, 2 when something needed cannot be reached.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO, Iterator

import typer
from sqlalchemy import select

from core.audit.anchors import ChainBroken, anchor_chain, load_anchors
from core.audit.export import EventFilter, record_export, stream_export
from core.audit.verify import VerifyResult, verify_chain, verify_export
from core.db import get_engine, session_scope
from core.provenance import read_png_provenance
from core.settings import get_settings
from core.storage import get_store
from models import AuditEvent, Image, Item

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


# -- provenance --------------------------------------------------------------------------------

def provenance(
    file: Annotated[Path, typer.Argument(help="an image InstaBatch generated", exists=True, dir_okay=False)],
    ledger: Annotated[bool | None, typer.Option(
        "--ledger/--no-ledger", help="check against the ledger (default: when DATABASE_URL is set "
                                     "or the embedded ledger exists)")] = None,
) -> None:
    """Print the provenance a PNG carries; confirm its sha256 against the ledger and the audit chain."""
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        chunks = read_png_provenance(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is no image
        raise fail(f"{file} is not a readable PNG ({type(exc).__name__})", 1) from None
    typer.echo(f"FILE {file} sha256={digest} bytes={len(data)}")
    for name in sorted(chunks):
        typer.echo(f"  {name}: {chunks[name]}")
    if not chunks:
        typer.echo("  (no InstaBatch provenance chunks)")
    if not (ledger if ledger is not None else _ledger_configured()):
        typer.echo("RESULT ledger=unchecked")
        raise typer.Exit(0 if chunks else 1)
    mismatches, image_id = _check_against_ledger(chunks, digest)
    for mismatch in mismatches:
        typer.echo(f"MISMATCH {mismatch}")
    ok = not mismatches
    typer.echo(f"RESULT ledger=checked match={str(ok).lower()} image_id={image_id or '-'} sha256={digest}")
    raise typer.Exit(0 if ok else 1)


def _ledger_configured() -> bool:
    settings = get_settings()
    if os.environ.get("DATABASE_URL"):
        return True
    return settings.uses_sqlite and Path(settings.database_url.removeprefix("sqlite:///")).exists()


def _check_against_ledger(chunks: dict[str, str], digest: str) -> tuple[list[str], str | None]:
    """What disagrees between the file, its chunks, the image row and the audit chain's record of
    the generation; and the ledger's image id. The image row can be edited; the chain's
    ``item.generated`` event cannot without ``audit verify`` noticing, so both are checked."""
    try:
        with session_scope() as session:
            row = _find_image(session, chunks, digest)
            if row is None:
                return ["no image in the ledger for this file (by sha256, or item_id and index)"], None
            image, item = row
            recorded = {
                "sha256": (digest, image.sha256), "item_id": (chunks.get("item_id"), item.id),
                "batch_id": (chunks.get("batch_id"), image.batch_id), "prompt": (chunks.get("prompt"), item.prompt),
                "seed": (chunks.get("seed"), str(image.seed)), "model": (chunks.get("model"), image.model_id),
                "weights_sha256": (chunks.get("weights_sha256"), image.weights_sha256),
            }
            in_chain = _generated_sha256s(session, item)
    except Exception as exc:  # noqa: BLE001 - an unreachable ledger is not a mismatch
        raise fail(f"cannot read the ledger ({type(exc).__name__}: {exc})") from None
    mismatches = [f"{name}: file has {found!r}, ledger has {expected!r}"
                  for name, (found, expected) in recorded.items()
                  if (found is not None or name == "sha256") and found != expected]
    if digest not in in_chain:
        mismatches.append(f"sha256: no item.generated audit event of item {item.id} records this file's sha256")
    return mismatches, image.id


def _generated_sha256s(session, item: Item) -> set[str]:
    """Every image sha256 that the audit chain says was generated for this item."""
    payloads = session.scalars(select(AuditEvent.payload).where(
        AuditEvent.batch_id == item.batch_id, AuditEvent.item_id == item.id, AuditEvent.action == "item.generated"))
    return {sha for payload in payloads for sha in (payload or {}).get("sha256", [])}


def _find_image(session, chunks: dict[str, str], digest: str) -> tuple[Image, Item] | None:
    """The image with this file's sha256; else the one its chunks name (item_id, index), to compare."""
    query = select(Image, Item).join(Item, Item.id == Image.item_id)
    found = session.execute(query.where(Image.sha256 == digest)).first()
    if found is None and chunks.get("item_id") and chunks.get("index", "").isdigit():
        found = session.execute(query.where(Image.item_id == chunks["item_id"], Image.index == int(chunks["index"]))
                                .order_by(Image.created_at.desc())).first()
    return (found.Image, found.Item) if found is not None else None
