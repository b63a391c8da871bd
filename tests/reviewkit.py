"""Helpers for the review tests: batches with images and QC results written straight to the ledger.

The worker is not needed to test the review workflow: these rows look like the worker's
(``worker/chunk.py`` ``_add_image``), and with ``with_png`` the PNGs lie in the configured store.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import insert, select, update

from core import ledger
from core.db import session_scope
from core.storage import get_store
from models import Image, Item, ItemState, QcResult
from models.base import new_id

BASE_TIME = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)
# The metrics a flagged image carries for each reason (just past the default thresholds).
FINDINGS = {
    "blurry": ("sharpness", {"laplacian_var": 0.2, "laplacian_ratio": 0.0001, "size": 256, "native_size": "64x64",
                             "upscaled": True}, {"sharpness_min": 0.0002, "sharpness_size": 256}),
    "near_duplicate": ("duplicate", {"nearest_distance": 2, "nearest_colour_distance": 3}, {
        "duplicate_max_distance": 2, "duplicate_max_colour_distance": 4}),
    "underexposed": ("exposure", {"luma_mean": 0.05, "clipped_low": 0.2, "clipped_high": 0.0}, {
        "underexposed_mean_max": 0.1, "overexposed_mean_min": 0.95, "clipped_fraction_max": 0.9}),
    "wrong_color": ("attribute_alignment", {"checked": True, "score": 0.3, "attributes": {
        "colour": {"wanted": "red", "seen": "blue", "p_wanted": 0.1, "p_seen": 0.8}}},
        {"align_min_score": 0.5, "attribute_min_prob": 0.5}),
    "black": ("black", {"luma_p99": 0.0, "luma_max": 0.0}, {"black_p99_max": 0.04}),
}
PASSING = ("contrast", {"rms_contrast": 0.2}, {"contrast_min": 0.012})


@dataclass
class Seeded:
    batch_id: str
    image_ids: list[str]  # in queue order: (created_at, id)
    item_ids: list[str]
    reasons: dict[str, list[str]]  # image id -> its QC reasons
    verdicts: dict[str, str]

    def flagged(self, reason: str | None = None) -> list[str]:
        """Image ids with verdict review (and this reason), in queue order."""
        return [i for i in self.image_ids if self.verdicts[i] == "review" and (reason is None or reason in self.reasons[i])]


def product_render(index: int) -> tuple[bytes, str]:
    """A tiny-model training render (64x64 PNG) and a caption of it; differs per index."""
    from instaflow.tiny.prompts import TRAIN_COMBOS, make_caption, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(index)
    attributes = random_attributes(rng, TRAIN_COMBOS)
    picture = render(attributes, rng)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue(), make_caption(attributes, rng)


def seed_batch(team: str, verdicts: Sequence[tuple[str, Sequence[str]]], *, name: str = "review test",
               with_png: bool = True, start: datetime = BASE_TIME, step: timedelta = timedelta(seconds=1),
               same_time_pairs: bool = False) -> Seeded:
    """A finished batch with one image per ``(verdict, reasons)``, created ``step`` apart from
    ``start`` (``same_time_pairs``: every two images share a timestamp, to exercise the id tiebreak)."""
    store = get_store()
    renders = [product_render(i) for i in range(len(verdicts))] if with_png else []
    prompts = [caption for _, caption in renders] or [f"a red ceramic mug, product photo {i}" for i in range(len(verdicts))]
    specs = [ledger.ItemSpec(prompt=prompt, external_id=f"sku-{i}", seed=i) for i, prompt in enumerate(prompts)]
    with session_scope() as session:
        batch, _ = ledger.submit_batch(session, ledger.BatchSpec(name=name, items=specs), team=team, actor="test")
        session.flush()
        items = session.execute(select(Item.id, Item.seq, Item.seed).where(Item.batch_id == batch.id).order_by(Item.seq)).all()
        session.execute(update(Item).where(Item.batch_id == batch.id).values(state=ItemState.SUCCEEDED.value))
        image_rows, qc_rows = [], []
        for position, ((verdict, reasons), item) in enumerate(zip(verdicts, items)):
            image_id = new_id()
            key = f"batches/{batch.id}/{item.seq:06d}-{item.id}/0.png"
            if with_png:
                store.put(key, renders[position][0], {"item_id": item.id})
            tick = position // 2 if same_time_pairs else position
            image_rows.append({
                "id": image_id, "item_id": item.id, "batch_id": batch.id, "index": 0, "seed": item.seed,
                "storage_key": key, "sha256": "0" * 64, "width": 64, "height": 64, "model_id": "tiny-test",
                "weights_sha256": "f" * 64, "qc_verdict": verdict, "qc_reasons": list(reasons),
                "created_at": start + tick * step,
            })
            qc_rows.extend(qc_result_rows(image_id, verdict, reasons, start + tick * step))
        session.execute(insert(Image), image_rows)
        if qc_rows:
            session.execute(insert(QcResult), qc_rows)
        batch_id = batch.id
    ordered = sorted(image_rows, key=lambda row: (row["created_at"], row["id"]))
    return Seeded(batch_id, [row["id"] for row in ordered], [item.id for item in items],
                  {row["id"]: row["qc_reasons"] for row in image_rows}, {row["id"]: row["qc_verdict"] for row in image_rows})


def qc_result_rows(image_id: str, verdict: str, reasons: Sequence[str], created_at: datetime) -> list[dict]:
    rows = []
    for reason in reasons:
        scorer, metrics, thresholds = FINDINGS[reason]
        rows.append({"image_id": image_id, "scorer": scorer, "scorer_version": "1", "metrics": metrics,
                     "thresholds": thresholds, "verdict": "reject" if reason == "black" else "review",
                     "reasons": [reason], "created_at": created_at})
    scorer, metrics, thresholds = PASSING
    rows.append({"image_id": image_id, "scorer": scorer, "scorer_version": "1", "metrics": metrics,
                 "thresholds": thresholds, "verdict": "pass", "reasons": [], "created_at": created_at})
    return rows
