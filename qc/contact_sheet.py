"""Contact sheets: a batch's images on one PNG grid, each tile badged with its QC verdict.

    from qc.contact_sheet import Tile, contact_sheet
    sheet = contact_sheet([Tile(image, "pass", "#0 sku-1"), (png_bytes, "review"), ...], title="spring")
    sheet.save("contact-sheet.png")

``batch_contact_sheet(session, store, batch_id)`` reads the tiles of a batch from the ledger
and the object store; the API (``GET /v1/batches/{id}/contact-sheet.png``) and ``instabatch
run`` both call it. Badges: green ``PASS``, amber ``REVIEW``, red ``REJECT``, grey when the
image has no verdict; a reviewer's decision is a second badge at the bottom right.
"""
from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from PIL import Image, ImageDraw, ImageFont

VERDICT_COLOURS = {"pass": (46, 157, 74), "review": (240, 165, 0), "reject": (217, 48, 37)}
DECISION_COLOURS = {"approved": (46, 157, 74), "rejected": (217, 48, 37), "regenerated": (66, 103, 210)}
NO_VERDICT_COLOUR = (120, 120, 120)
BACKGROUND = (250, 250, 250)
INK = (30, 30, 30)
MISSING = (205, 205, 205)
BORDER = 4
GAP = 8
LABEL_HEIGHT = 18
TITLE_HEIGHT = 40
DEFAULT_COLUMNS = 10
FETCH_THREADS = 8

ImageSource = Union[Image.Image, bytes, str, Path, None]  # None: the object is missing


@dataclass(frozen=True)
class Tile:
    image: ImageSource
    verdict: str | None
    label: str = ""
    decision: str | None = None  # approved | rejected | regenerated


def as_tile(entry: Tile | Sequence[Any]) -> Tile:
    """A Tile, or a tuple ``(image, verdict[, label[, decision]])``."""
    return entry if isinstance(entry, Tile) else Tile(*entry)


def contact_sheet(images_with_verdicts: Iterable[Tile | Sequence[Any]], *, tile_size: int = 128,
                  columns: int | None = None, title: str | None = None) -> Image.Image:
    """The grid as an RGB image. Small images are upscaled without smoothing (pixels stay pixels),
    large ones downscaled; the aspect ratio is kept. The title line adds the verdict counts."""
    tiles = [as_tile(entry) for entry in images_with_verdicts]
    columns = max(1, columns or min(DEFAULT_COLUMNS, max(len(tiles), 1)))
    rows = max(1, math.ceil(len(tiles) / columns))
    cell_w, cell_h = tile_size + 2 * BORDER, tile_size + 2 * BORDER + LABEL_HEIGHT
    header = TITLE_HEIGHT if title is not None else 0
    sheet = Image.new("RGB", (GAP + columns * (cell_w + GAP), header + GAP + rows * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title is not None:
        draw.text((GAP, 8), f"{title}   {summary_line(tiles)}", fill=INK, font=font(18))
    if not tiles:
        draw.text((GAP, header + GAP), "no images", fill=INK, font=font(14))
    for position, entry in enumerate(tiles):
        row, column = divmod(position, columns)
        x, y = GAP + column * (cell_w + GAP), header + GAP + row * (cell_h + GAP)
        draw_tile(sheet, draw, entry, x, y, tile_size)
    return sheet


def summary_line(tiles: Sequence[Tile]) -> str:
    counts = Counter(tile.verdict or "unchecked" for tile in tiles)
    order = ["pass", "review", "reject", "unchecked"]
    return " · ".join(f"{name} {counts[name]}" for name in order if counts[name]) or "no images"


def draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, entry: Tile, x: int, y: int, size: int) -> None:
    colour = VERDICT_COLOURS.get(entry.verdict or "", NO_VERDICT_COLOUR)
    draw.rectangle((x, y, x + size + 2 * BORDER - 1, y + size + 2 * BORDER - 1), fill=colour)
    picture = fit(load(entry.image), size)
    if picture is None:
        draw.rectangle((x + BORDER, y + BORDER, x + BORDER + size - 1, y + BORDER + size - 1), fill=MISSING)
        draw.text((x + BORDER + 6, y + BORDER + size // 2 - 7), "missing", fill=INK, font=font(12))
    else:
        offset = ((size - picture.width) // 2, (size - picture.height) // 2)
        sheet.paste(picture, (x + BORDER + offset[0], y + BORDER + offset[1]))
    badge(draw, (entry.verdict or "no qc").upper(), colour, (x + BORDER, y + BORDER), anchor="top-left")
    if entry.decision:
        corner = (x + BORDER + size, y + BORDER + size)
        badge(draw, entry.decision.upper(), DECISION_COLOURS.get(entry.decision, NO_VERDICT_COLOUR), corner,
              anchor="bottom-right")
    if entry.label:
        draw.text((x, y + size + 2 * BORDER + 2), clip_text(draw, entry.label, size + 2 * BORDER, font(12)),
                  fill=INK, font=font(12))


def badge(draw: ImageDraw.ImageDraw, text: str, colour: tuple[int, int, int], corner: tuple[int, int],
          anchor: str) -> None:
    face = font(11)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    width, height = right - left + 8, bottom - top + 6
    x, y = corner if anchor == "top-left" else (corner[0] - width, corner[1] - height)
    draw.rectangle((x, y, x + width - 1, y + height - 1), fill=colour)
    draw.text((x + 4 - left, y + 3 - top), text, fill=(255, 255, 255), font=face)


def clip_text(draw: ImageDraw.ImageDraw, text: str, width: int, face: Any) -> str:
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"


@lru_cache(maxsize=8)
def font(size: int) -> Any:
    return ImageFont.load_default(size=size)


def load(source: ImageSource) -> Image.Image | None:
    if source is None:
        return None
    try:
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source)).convert("RGB")
        return Image.open(source).convert("RGB")
    except (OSError, ValueError):  # unreadable bytes are shown as missing, never fail the sheet
        return None


def fit(picture: Image.Image | None, size: int) -> Image.Image | None:
    if picture is None:
        return None
    scale = size / max(picture.width, picture.height)
    target = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return picture.resize(target, resample)


# -- from the ledger -------------------------------------------------------------------------

def batch_tiles(session: Any, store: Any, batch_id: str, *, verdicts: Sequence[str] = (), limit: int = 500,
                offset: int = 0) -> tuple[list[Tile], int]:
    """A batch's images in item order as tiles (fetched from the store in parallel), and how many
    images match in all. A missing or unreadable object becomes a grey ``missing`` tile."""
    from sqlalchemy import func, select

    from models import Image as ImageRow
    from models import Item

    query = select(ImageRow, Item.seq, Item.external_id).join(Item, Item.id == ImageRow.item_id) \
        .where(ImageRow.batch_id == batch_id)
    if verdicts:
        query = query.where(ImageRow.qc_verdict.in_(list(verdicts)))
    total = session.scalar(query.with_only_columns(func.count(ImageRow.id)).order_by(None)) or 0
    rows = session.execute(
        query.order_by(Item.seq, ImageRow.index, ImageRow.created_at, ImageRow.id).offset(offset).limit(limit)
    ).all()

    def fetch(key: str) -> bytes | None:
        try:
            return store.get(key)
        except Exception:  # noqa: BLE001 - KeyError, a store outage: the tile says "missing"
            return None

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        payloads = list(pool.map(fetch, [row.Image.storage_key for row in rows]))
    tiles = [
        Tile(data, row.Image.qc_verdict, tile_label(row.seq, row.external_id, row.Image), row.Image.review_status)
        for row, data in zip(rows, payloads)
    ]
    return tiles, total


def tile_label(seq: int, external_id: str | None, image: Any) -> str:
    label = f"#{seq}" + (f".{image.index}" if image.index else "") + (f" {external_id}" if external_id else "")
    return label + (" (regen)" if image.parent_image_id else "")


def batch_contact_sheet(session: Any, store: Any, batch_id: str, *, verdicts: Sequence[str] = (),
                        limit: int = 500, offset: int = 0, tile_size: int = 128,
                        columns: int | None = None) -> Image.Image:
    """The contact sheet of one batch (its first ``limit`` images from ``offset``)."""
    from models import Batch

    batch = session.get(Batch, batch_id)
    if batch is None:
        raise KeyError(batch_id)
    tiles, total = batch_tiles(session, store, batch_id, verdicts=verdicts, limit=limit, offset=offset)
    shown = f" (images {offset + 1}–{offset + len(tiles)} of {total})" if len(tiles) < total else ""
    return contact_sheet(tiles, tile_size=tile_size, columns=columns, title=f"{batch.name}{shown}")


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()
