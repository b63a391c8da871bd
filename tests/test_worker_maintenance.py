"""The worker's periodic maintenance tasks, run through a real Celery worker on the embedded broker."""
from __future__ import annotations

import time

from core.audit.anchors import list_anchors
from core.broker import ANCHOR_TASK, MAINTENANCE_QUEUE
from tests.workerkit import build_stack, running_worker


def test_beat_schedules_the_sweep_and_the_audit_anchor(configure, random_checkpoint):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint))
    schedule = {entry["task"]: entry for entry in stack.app.conf.beat_schedule.values()}
    assert schedule[ANCHOR_TASK]["schedule"] == stack.settings.anchor_every_seconds
    assert schedule[ANCHOR_TASK]["options"]["queue"] == MAINTENANCE_QUEUE


def test_anchor_task_writes_the_chain_head_to_storage(configure, random_checkpoint):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint))
    batch_id = stack.submit(["a red mug on a white backdrop"], dispatch=False)  # writes audit events
    assert batch_id
    with running_worker(stack):
        stack.app.send_task(ANCHOR_TASK, queue=MAINTENANCE_QUEUE)
        deadline = time.monotonic() + 60
        while not list_anchors(stack.store) and time.monotonic() < deadline:
            time.sleep(0.2)
    anchors = list_anchors(stack.store)
    assert len(anchors) == 1
    assert anchors[0].seq >= 1
