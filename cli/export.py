"""Writing a batch's images and ``results.csv`` into a folder (``instabatch run --out DIR``)."""
from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.storage import ObjectStore
from models import Image, Item

# sha256 is the PNG file's; the file carries its item and batch ids (provenance), so a fresh batch
# of the same prompts and seeds has other file hashes. pixels_sha256 hashes the decoded pixels
# alone: it is what stays equal when the same prompt, seed and model are generated again.
RESULT_COLUMNS = ("item_id", "external_id", "prompt", "seed", "image_path", "sha256", "state",
                  "image_index", "qc_verdict", "qc_reasons", "error", "pixels_sha256")
CONTACT_SHEET = "contact-sheet.png"
IMAGES_DIR = "images"


class ExportError(RuntimeError):
    pass


@dataclass
class ExportSummary:
    rows: int
    images: int
    results_csv: Path


def export_batch(sessions: sessionmaker[Session], store: ObjectStore, batch_id: str, out_dir: Path) -> ExportSummary:
    """One row per image (and one per item that has none); every file's sha256 checked against the ledger."""
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with sessions() as session:
        items = session.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.seq)).all()
        images = session.scalars(select(Image).where(Image.batch_id == batch_id)).all()
    by_item: dict[str, list[Image]] = {}
    for image in sorted(images, key=lambda i: (i.item_id, i.index, i.created_at)):
        by_item.setdefault(image.item_id, []).append(image)

    rows, written = [], 0
    for item in items:
        item_images = by_item.get(item.id, [])
        for image in item_images:
            relative = Path(IMAGES_DIR) / image_filename(item, image.index)
            data = write_checked(store, image, out_dir / relative)
            written += 1
            rows.append({**result_row(item, image, relative.as_posix()), "pixels_sha256": pixels_sha256(data)})
        if not item_images:
            rows.append(result_row(item, None, ""))
    write_contact_sheet(sessions, store, batch_id, out_dir / CONTACT_SHEET)
    results = out_dir / "results.csv"
    with open(results, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return ExportSummary(rows=len(rows), images=written, results_csv=results)


def image_filename(item: Item, index: int) -> str:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", item.external_id or "")[:80].strip("._") or "item"
    return f"{item.seq:06d}-{label}-{index}.png"


def write_checked(store: ObjectStore, image: Image, path: Path) -> bytes:
    data = store.get(image.storage_key)
    digest = hashlib.sha256(data).hexdigest()
    if digest != image.sha256:
        raise ExportError(f"{image.storage_key}: stored bytes have sha256 {digest}, the ledger says {image.sha256}")
    path.write_bytes(data)
    return data


def pixels_sha256(png: bytes) -> str:
    with PILImage.open(io.BytesIO(png)) as picture:
        rgb = picture.convert("RGB")
        return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


def write_contact_sheet(sessions: sessionmaker[Session], store: ObjectStore, batch_id: str, path: Path) -> None:
    """The batch at a glance, a verdict badge on each tile (the API serves the same sheet)."""
    from qc.contact_sheet import batch_contact_sheet

    with sessions() as session:
        batch_contact_sheet(session, store, batch_id).save(path)


def result_row(item: Item, image: Image | None, image_path: str) -> dict[str, object]:
    return {
        "item_id": item.id, "external_id": item.external_id or "", "prompt": item.prompt,
        "seed": image.seed if image else item.seed, "image_path": image_path,
        "sha256": image.sha256 if image else "", "state": item.state,
        "image_index": image.index if image else "", "qc_verdict": (image.qc_verdict or "") if image else "",
        "qc_reasons": ";".join(image.qc_reasons or []) if image else "", "error": item.error or "",
    }
