"""The invariant checker run after every scenario, on the private PostgreSQL and the S3 bucket directly.

For the scenario's batches:

- every item is terminal (``stuck``: the ones that are not);
- no innocent item ended ``failed`` or ``dead``: a fault in the infrastructure (a kill, an outage,
  a lost broker) must cost time, never an item, so such an item counts as ``lost``; only the
  scenario's own poison items (``may_fail``) may end that way;
- each succeeded item has exactly ``num_images`` image rows (regenerations aside), indexes
  0..n-1 once each, one ``item.generated`` event; each image's object exists and its sha256 is
  the ledger's (``lost`` otherwise); more rows, a repeated index or a second recorded run is
  ``duplicated``; an item that did not succeed holds no image;
- the batch's counts match its items (total_items, total_images, finished_at, the API's counts);
- the audit chain verifies with the project's verifier (``core.audit.verify.verify_chain``,
  against the anchors in the bucket);
- objects under the batch with no image row are reported as orphans (not a failure: a run that
  stored an image and died before recording it leaves one, and a redelivery adopts it).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Collection
from typing import Any

from sqlalchemy import text

from core.audit.anchors import load_anchors
from core.audit.verify import verify_chain
from core.storage import S3ObjectStore
from tests.faults.stack import S3_PREFIX, TERMINAL, FaultStack

MAX_LISTED = 5


@dataclass
class InvariantReport:
    items: int = 0
    states: dict[str, int] = field(default_factory=dict)
    stuck: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    chain_ok: bool = False
    chain: str = ""
    objects_checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.stuck or self.lost or self.duplicated or self.mismatches) and self.chain_ok

    def problems(self) -> str:
        parts = []
        for name in ("stuck", "lost", "duplicated", "mismatches", "orphans"):
            values = getattr(self, name)
            if values:
                shown = "; ".join(values[:MAX_LISTED]) + (f"; ... {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")
                parts.append(f"{name}={len(values)}: {shown}")
        if not self.chain_ok:
            parts.append(f"audit chain: {self.chain}")
        return " | ".join(parts) or "none"


UNSUCCESSFUL = ("failed", "dead")


def check(stack: FaultStack, batch_ids: list[str], *, idempotency_keys: Collection[str] = (),
          may_fail: Collection[str] = ()) -> InvariantReport:
    report = InvariantReport()
    with stack.engine.connect() as conn:
        for batch_id in batch_ids:
            _check_batch(conn, stack, batch_id, report, set(may_fail))
        for key in idempotency_keys:
            n = conn.execute(text("SELECT count(*) FROM batches WHERE idempotency_key = :k"), {"k": key}).scalar()
            if n != 1:
                (report.duplicated if n > 1 else report.lost).append(f"{n} batches for Idempotency-Key {key}")
    _check_chain(stack, report)
    return report


def _check_batch(conn: Any, stack: FaultStack, batch_id: str, report: InvariantReport, may_fail: set[str]) -> None:
    batch = conn.execute(text("SELECT total_items, total_images, finished_at FROM batches WHERE id = :b"),
                         {"b": batch_id}).one()
    items = conn.execute(text("SELECT id, seq, state, num_images, attempts FROM items WHERE batch_id = :b ORDER BY seq"),
                         {"b": batch_id}).all()
    images = conn.execute(text(
        "SELECT id, item_id, \"index\", storage_key, sha256, parent_image_id FROM images WHERE batch_id = :b"),
        {"b": batch_id}).all()
    generated = dict(conn.execute(text(
        "SELECT item_id, count(*) FROM audit_events WHERE batch_id = :b AND action = 'item.generated' GROUP BY item_id"),
        {"b": batch_id}).all())

    report.items += len(items)
    states: dict[str, int] = defaultdict(int)
    for item in items:
        states[item.state] += 1
        report.states[item.state] = report.states.get(item.state, 0) + 1
    originals: dict[str, list[Any]] = defaultdict(list)
    for image in images:
        if image.parent_image_id is None:
            originals[image.item_id].append(image)

    if batch.total_items != len(items):
        report.lost.append(f"batch {batch_id}: total_items={batch.total_items} but {len(items)} item rows")
    if batch.total_images != sum(item.num_images for item in items):
        report.mismatches.append(f"batch {batch_id}: total_images={batch.total_images} != sum(num_images)")
    for item in items:
        label = f"item seq={item.seq} ({item.id[:8]}, {item.state}, attempts={item.attempts})"
        if item.state not in TERMINAL:
            report.stuck.append(label)
        if item.state in UNSUCCESSFUL and item.id not in may_fail:
            report.lost.append(f"{label}: an innocent item ended {item.state}")
        rows = originals.get(item.id, [])
        if item.state == "succeeded":
            indexes = sorted(row.index for row in rows)
            if len(rows) > item.num_images or len(set(indexes)) != len(indexes):
                report.duplicated.append(f"{label}: {len(rows)} image rows, indexes {indexes}, num_images={item.num_images}")
            elif indexes != list(range(item.num_images)):
                report.lost.append(f"{label}: image indexes {indexes}, num_images={item.num_images}")
            if generated.get(item.id, 0) > 1:
                report.duplicated.append(f"{label}: {generated[item.id]} item.generated events (two recorded runs)")
            elif generated.get(item.id, 0) == 0:
                report.mismatches.append(f"{label}: succeeded without an item.generated event")
        elif rows:
            report.mismatches.append(f"{label}: not succeeded but holds {len(rows)} image rows")

    all_terminal = not any(item.state not in TERMINAL for item in items)
    if all_terminal and batch.finished_at is None:
        report.mismatches.append(f"batch {batch_id}: every item terminal but finished_at is unset")
    if not all_terminal and batch.finished_at is not None:
        report.mismatches.append(f"batch {batch_id}: finished_at set with items still active")
    api = stack.api_batch(batch_id)
    if api is not None:
        api_counts = {state: n for state, n in api.get("counts", {}).items() if n}
        if api_counts != {state: n for state, n in states.items() if n}:
            report.mismatches.append(f"batch {batch_id}: API counts {api_counts} != ledger {dict(states)}")

    # Objects: exactly one per image row with the ledger's sha256; anything else under the batch is an orphan.
    prefix = f"{S3_PREFIX}/batches/{batch_id}/"
    objects = _list(stack, prefix)
    keys = {f"{S3_PREFIX}/{image.storage_key}": image for image in images}
    for key, image in keys.items():
        if key not in objects:
            report.lost.append(f"image {image.id[:8]} (item {image.item_id[:8]}): no object at {image.storage_key}")
            continue
        body = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
        report.objects_checked += 1
        if hashlib.sha256(body).hexdigest() != image.sha256:
            report.lost.append(f"image {image.id[:8]}: object sha256 differs from the ledger's")
    report.orphans.extend(sorted(key[len(S3_PREFIX) + 1:] for key in objects if key not in keys))


def _list(stack: FaultStack, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    return keys


def _check_chain(stack: FaultStack, report: InvariantReport) -> None:
    store = S3ObjectStore(stack.bucket, stack.infra.moto.url, prefix=S3_PREFIX)
    store.client = stack.s3  # moto itself (not the proxy), with the harness's dummy credentials
    anchors = load_anchors(store)
    result = verify_chain(stack.engine, anchors)
    report.chain_ok = bool(result.ok)
    report.chain = result.summary() + ("" if result.ok else " " + "; ".join(
        f"{p.kind}@{p.seq}: {p.detail}" for p in result.problems[:3]))
