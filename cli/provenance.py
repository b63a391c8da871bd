"""``instabatch provenance FILE``: what an image (PNG, WebP or JPEG) says about itself, checked against the ledger.

Ends with one ``RESULT`` line; exit 0 when the file, its PNG chunks, the image row and the audit
chain's ``item.generated`` event agree (PNG text chunks; XMP in WebP and JPEG), 1 when they do not, 2 when the ledger cannot be reached.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import select

from cli.audit import fail
from core.db import session_scope
from core.provenance import read_provenance
from core.settings import get_settings
from models import AuditEvent, Image, Item


def provenance(
    file: Annotated[Path, typer.Argument(help="an image InstaBatch generated", exists=True, dir_okay=False)],
    ledger: Annotated[bool | None, typer.Option(
        "--ledger/--no-ledger", help="check against the ledger (default: when DATABASE_URL is set "
                                     "or the embedded ledger exists)")] = None,
) -> None:
    """Print the provenance an image carries (PNG, WebP, JPEG); confirm its sha256 against the ledger and the audit chain."""
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        chunks = read_provenance(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is no image
        raise fail(f"{file} is not a readable PNG, WebP or JPEG ({type(exc).__name__})", 1) from None
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
