"""The read side of a batch's results: rows streamed page by page, as CSV, JSONL or a zip archive.

A 10,000-item batch never sits in memory at once: each page of items is read in its own short
session (keyset on ``items.seq``), turned into rows and written out before the next page is read.
The archive is built by zipstream-ng as the bytes go out (stored, not deflated: PNGs are already
compressed); images are fetched from the store a few at a time, just before they are written, and
checked against the ledger's sha256 (docs/architecture.md, "Results out, progress pushed, the remote client").
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import or_, select
from zipstream import ZipStream

from api.schemas.results import RESULT_COLUMNS, ResultRow
from api.signing import object_url
from core.db import get_engine, session_factory
from core.storage import ObjectStore
from models import Image, Item

PAGE_ITEMS = 500
FETCH_AHEAD = 8  # objects fetched at once for the archive
MANIFEST_NAME = "manifest.csv"
IMAGES_DIR = "images"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ResultFilter:
    """Which rows: item states, external ids, and images whose QC verdict is one of ``verdicts`` or
    whose review decision is one of ``decisions`` (empty = all)."""

    states: Sequence[str] = ()
    verdicts: Sequence[str] = ()
    decisions: Sequence[str] = ()
    external_ids: Sequence[str] = ()

    @property
    def images_only(self) -> bool:
        return bool(self.verdicts or self.decisions)


@dataclass
class FileNamer:
    """Archive paths named by external id (``images/sku-1.png``), unique within one stream."""

    used: set[str] = field(default_factory=set)

    def name(self, item: Item, image: Image) -> str:
        label = _UNSAFE.sub("_", item.external_id or "")[:100].strip("._") or f"item-{item.seq:06d}"
        suffix = f"-{image.index}" if image.index else ""
        if image.parent_image_id:  # a regenerated image sits beside the one it replaces
            suffix += f"-r{image.id[:8]}"
        extension = _format_of(image.storage_key)
        path = f"{IMAGES_DIR}/{label}{suffix}.{extension}"
        if path in self.used:  # two items with one external id: the second gets its seq too
            path = f"{IMAGES_DIR}/{label}-{item.seq:06d}{suffix}.{extension}"
        self.used.add(path)
        return path


def _format_of(key: str) -> str:
    return key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else "png"


def result_pages(batch_id: str, filters: ResultFilter, *, base_url: str | None,
                 page_items: int = PAGE_ITEMS) -> Iterator[list[ResultRow]]:
    """Rows in submission order (item seq, image index), one list per page of items.

    ``base_url`` None leaves the download URLs out (the archive's manifest has the files instead).
    """
    sessions = session_factory(get_engine())
    namer = FileNamer()
    after = -1
    while True:
        with sessions() as session:
            items = list(session.scalars(_items_query(batch_id, filters, after).limit(page_items)))
            images = _images_of(session, [item.id for item in items], filters)
            session.expunge_all()
        if not items:
            return
        after = items[-1].seq
        rows = [row for item in items for row in _rows_of(item, images.get(item.id, []), filters, namer, base_url)]
        if rows:
            yield rows


def _items_query(batch_id: str, filters: ResultFilter, after: int):
    query = select(Item).where(Item.batch_id == batch_id, Item.seq > after)
    if filters.states:
        query = query.where(Item.state.in_(filters.states))
    if filters.external_ids:
        query = query.where(Item.external_id.in_(filters.external_ids))
    return query.order_by(Item.seq)


def _images_of(session, item_ids: list[str], filters: ResultFilter) -> dict[str, list[Image]]:
    if not item_ids:
        return {}
    query = select(Image).where(Image.item_id.in_(item_ids))
    # Either matches: ?verdict=pass&decision=approved is what can ship (QC passed, or a reviewer approved).
    wanted = ([Image.qc_verdict.in_(filters.verdicts)] if filters.verdicts else []) + (
        [Image.review_status.in_(filters.decisions)] if filters.decisions else [])
    if wanted:
        query = query.where(or_(*wanted))
    images: dict[str, list[Image]] = {}
    for image in session.scalars(query.order_by(Image.item_id, Image.index, Image.created_at, Image.id)):
        images.setdefault(image.item_id, []).append(image)
    return images


def _rows_of(item: Item, images: list[Image], filters: ResultFilter, namer: FileNamer,
             base_url: str | None) -> Iterator[ResultRow]:
    base = {"item_id": item.id, "seq": item.seq, "external_id": item.external_id, "prompt": item.prompt,
            "seed": item.seed, "state": item.state, "error": item.error}
    if not images:
        if not filters.images_only:
            yield ResultRow(**base)
        return
    for image in images:
        yield ResultRow(
            **{**base, "seed": image.seed}, image_id=image.id, image_index=image.index,
            parent_image_id=image.parent_image_id, verdict=image.qc_verdict, qc_reasons=image.qc_reasons or [],
            decision=image.review_status, sha256=image.sha256, width=image.width, height=image.height,
            format=_format_of(image.storage_key), object_key=image.storage_key,
            file_name=namer.name(item, image),
            url=object_url(image.storage_key, base_url) if base_url is not None else None, model=image.model_id,
        )


# -- encodings ------------------------------------------------------------------------------

def csv_stream(pages: Iterator[list[ResultRow]]) -> Iterator[bytes]:
    """A UTF-8 CSV with a header (and a BOM, so Excel reads the prompts' accents right)."""
    yield "\ufeff".encode() + _csv_lines([list(RESULT_COLUMNS)])
    for rows in pages:
        yield _csv_lines(row.csv_cells() for row in rows)


def _csv_lines(rows) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


def jsonl_stream(pages: Iterator[list[ResultRow]]) -> Iterator[bytes]:
    for rows in pages:
        yield "".join(row.model_dump_json() + "\n" for row in rows).encode()


class ArchiveError(RuntimeError):
    """A stored object's bytes do not match the ledger's sha256: the archive stops there."""


def archive_stream(pages: Iterator[list[ResultRow]], store: ObjectStore) -> Iterator[bytes]:
    """``images/<external id>.png`` for every image row, then ``manifest.csv`` (with each file's size).

    Images are fetched ``FETCH_AHEAD`` at a time in threads (an S3 GET is mostly waiting) and
    written out before the next ones are asked for, so at most that many sit in memory; the
    manifest collects in a spooled temporary file (on disk past 1 MB), added last.
    """
    archive = ZipStream(sized=False)
    with tempfile.SpooledTemporaryFile(max_size=1 << 20) as manifest, \
            ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="archive") as pool:
        manifest.write(_csv_lines([list(RESULT_COLUMNS)]))
        for rows in pages:
            manifest.writelines(_csv_lines([row.csv_cells()]) for row in rows if not row.object_key)
            images = [row for row in rows if row.object_key and row.file_name]
            for start in range(0, len(images), FETCH_AHEAD):
                batch = images[start:start + FETCH_AHEAD]
                fetches = [pool.submit(_checked_object, store, row) for row in batch]
                for row, fetch in zip(batch, fetches):
                    archive.add(_written(fetch, row, manifest), row.file_name)
                yield from archive.all_files()
        manifest.seek(0)
        archive.add(_read_chunks(manifest), MANIFEST_NAME)
        yield from archive.finalize()


def _checked_object(store: ObjectStore, row: ResultRow) -> bytes:
    data = store.get(row.object_key)
    digest = hashlib.sha256(data).hexdigest()
    if digest != row.sha256:
        raise ArchiveError(f"{row.object_key}: stored sha256 {digest}, the ledger says {row.sha256}")
    return data


def _written(fetch: Future[bytes], row: ResultRow, manifest: BinaryIO) -> Iterator[bytes]:
    data = fetch.result()
    manifest.write(_csv_lines([row.model_copy(update={"bytes": len(data)}).csv_cells()]))
    yield data


def _read_chunks(handle: BinaryIO, size: int = 1 << 16) -> Iterator[bytes]:
    while chunk := handle.read(size):
        yield chunk
