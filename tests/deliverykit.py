"""Finished batches written straight to the ledger and the store, for the delivery tests.

Generating 10,000 images with the model would take the shared CPU most of an hour; the results
stream, the archive and the client only read rows and objects, so these rows look like the
worker's (``worker/chunk.py``) with small real PNGs whose sha256 the ledger records.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image as PILImage
from sqlalchemy import insert, select, update

from core import ledger
from core.db import session_scope
from core.storage import ObjectStore, get_store
from models import Image, Item, ItemState, utcnow
from models.base import new_id

UPLOAD_THREADS = 8


@dataclass
class Delivered:
    batch_id: str
    sha256: dict[str, str]  # storage key -> sha256 of its bytes
    external_ids: list[str]


def tiny_png(index: int) -> bytes:
    """An 8x8 PNG, different for every index below 2**24."""
    colour = (index & 0xFF, (index >> 8) & 0xFF, (index >> 16) & 0xFF)
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def seed_delivered(team: str, n: int, *, verdicts: Sequence[str] = ("pass",), decisions: Sequence[str | None] = (None,),
                   failed_every: int = 0, name: str = "delivered", store: ObjectStore | None = None,
                   external_id: str = "sku-{i:05d}", submitted_by: str | None = None,
                   params: dict | None = None) -> Delivered:
    """A finished batch of ``n`` items, each with one image (verdict and decision cycle through the
    given lists), except every ``failed_every``-th item, which failed without one."""
    store = store or get_store()
    specs = [ledger.ItemSpec(prompt=f"a ceramic mug, product photo, variant {i}", external_id=external_id.format(i=i),
                             seed=i) for i in range(n)]
    with session_scope() as session:
        batch, _ = ledger.submit_batch(session, ledger.BatchSpec(name=name, items=specs, params=params or {}), team=team, actor="test",
                                       submitted_by=submitted_by, chunk_images=1000)
        items = session.execute(select(Item.id, Item.seq).where(Item.batch_id == batch.id).order_by(Item.seq)).all()
        batch_id = batch.id
    failed = {item.id for item in items if failed_every and item.seq % failed_every == failed_every - 1}
    objects = {f"batches/{batch_id}/{item.seq:06d}-{item.id}/0.png": tiny_png(item.seq)
               for item in items if item.id not in failed}
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda pair: store.put(pair[0], pair[1], {}), objects.items()))
    rows = [{
        "id": new_id(), "item_id": item.id, "batch_id": batch_id, "index": 0, "seed": item.seq,
        "storage_key": key, "sha256": hashlib.sha256(objects[key]).hexdigest(), "width": 8, "height": 8,
        "model_id": "tiny-test", "weights_sha256": "f" * 64,
        "qc_verdict": verdicts[item.seq % len(verdicts)], "qc_reasons": [],
        "review_status": decisions[item.seq % len(decisions)],
    } for item in items if item.id not in failed
        for key in [f"batches/{batch_id}/{item.seq:06d}-{item.id}/0.png"]]
    with session_scope() as session:
        for start in range(0, len(rows), 1000):
            session.execute(insert(Image), rows[start:start + 1000])
        session.execute(update(Item).where(Item.batch_id == batch_id, Item.id.not_in(failed))
                        .values(state=ItemState.SUCCEEDED.value, attempts=1, finished_at=utcnow()))
        if failed:
            session.execute(update(Item).where(Item.id.in_(failed))
                            .values(state=ItemState.FAILED.value, attempts=3, error="test: no image",
                                    finished_at=utcnow()))
    return Delivered(batch_id, {row["storage_key"]: row["sha256"] for row in rows}, [s.external_id for s in specs])


@contextmanager
def served_api() -> Iterator[str]:
    """The app under a real uvicorn on a loopback port, in a thread of this process (so it shares
    the test's settings); yields its base URL."""
    import uvicorn

    from api.main import create_app
    from tests.fixtures.services import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
