"""Issue 10's fault scenarios, each mid-batch on the real stack (tests/faults/stack.py).

``make faults`` runs all nine; ``make test`` the short form (2, 3 and 6 on small batches).
Each ends with the invariant checker (tests/faults/invariants.py) and a RESULT line.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.faults.fault_app import REGEN_MARKER
from tests.faults.runner import Scenario, batch_items, say
from tests.faults.services import wait_until
from tests.faults.stack import Bounds, FaultStack, base_env, batch_body, product_settings
from tests.worker_fault_app import CRASH_MARKER

FAULT_APP = "tests.faults.fault_app"
OUTAGE_S = 15.0
# Generous: the hard bound of a scenario (derived from the product's settings) plus the stack's start.
TIMEOUT = int(Bounds.of(product_settings(base_env(Path(os.devnull))), 4 * batch_items()).hard_s + 900)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]


# -- 1: kill -9 of a prefork child -----------------------------------------------------------

def test_kill_prefork_child(fault_stack: FaultStack) -> None:
    worker = fault_stack.start_worker("prefork", concurrency=2)
    sc = Scenario(fault_stack, "kill_prefork_child", batch_body("faults 1", batch_items()))
    sc.submit()
    pid, item_ids = sc.wait_chunk_running(worker.children)
    sc.mark_fault(f"kill -9 prefork child {pid}", item_ids)
    os.kill(pid, signal.SIGKILL)
    sc.finish()


# -- 2: kill -9 of a solo worker, then a new one ---------------------------------------------

@pytest.mark.faults_short
def test_kill_solo_worker(fault_stack: FaultStack) -> None:
    solo = fault_stack.start_worker("solo")
    sc = Scenario(fault_stack, "kill_solo_worker", batch_body("faults 2", batch_items()))
    sc.submit()
    pid, item_ids = sc.wait_chunk_running(lambda: [solo.pid])
    sc.mark_fault(f"kill -9 solo worker {pid}, then a new one", item_ids)
    solo.kill()
    fault_stack.start_worker("solo", wait=False)
    sc.finish()


# -- 3: Redis restarted without persistence ----------------------------------------------------

@pytest.mark.faults_short
def test_redis_restart_loses_messages(fault_stack: FaultStack) -> None:
    fault_stack.start_worker("solo")
    fault_stack.start_worker("prefork", concurrency=2)
    sc = Scenario(fault_stack, "redis_restart", batch_body("faults 3", batch_items()))
    sc.submit()
    sc.wait_chunk_running()
    running = [i for ids in fault_stack.running_owners(sc.batch_id).values() for i in ids]
    sc.mark_fault(f"Redis killed and restarted empty (broker {fault_stack.broker_depths()})", running)
    fault_stack.redis.restart()
    sc.finish()


# -- 4: PostgreSQL down 15 s -------------------------------------------------------------------

def test_postgres_down(fault_stack: FaultStack) -> None:
    fault_stack.start_worker("solo")
    fault_stack.start_worker("prefork", concurrency=2)
    sc = Scenario(fault_stack, "postgres_down", batch_body("faults 4", batch_items()))
    sc.submit()
    sc.wait_chunk_running()
    running = [i for ids in fault_stack.running_owners(sc.batch_id).values() for i in ids]
    sc.mark_fault(f"pg_ctl stop -m fast; sleep {OUTAGE_S:.0f}; start", running)
    pg = fault_stack.infra.pg
    try:
        pg.stop("fast")
        time.sleep(OUTAGE_S)
    finally:
        pg.start()
    sc.finish()


# -- 5: S3 down 15 s ---------------------------------------------------------------------------

def test_s3_down(fault_stack: FaultStack) -> None:
    """moto keeps everything in memory, so it is not stopped: the proxy between the stack and moto
    refuses connections (and cuts the open ones) for 15 s, which is what clients of a stopped
    server see, and the bucket and its objects survive."""
    fault_stack.start_worker("solo")
    fault_stack.start_worker("prefork", concurrency=2)
    sc = Scenario(fault_stack, "s3_down", batch_body("faults 5", batch_items()))
    sc.submit()
    sc.wait_chunk_running()
    running = [i for ids in fault_stack.running_owners(sc.batch_id).values() for i in ids]
    sc.mark_fault(f"S3 refuses connections for {OUTAGE_S:.0f}s (proxy down)", running)
    try:
        fault_stack.s3_proxy.down()
        time.sleep(OUTAGE_S)
    finally:
        fault_stack.s3_proxy.up()
    sc.finish()


# -- 6: a poison prompt that kills the worker every time ---------------------------------------

@pytest.mark.faults_short
def test_poison_prompt(fault_stack: FaultStack) -> None:
    n = batch_items()
    prompts = [f"a ceramic mug, product photo, variant {i}" for i in range(n)]
    poison = min(5, n - 1)
    prompts[poison] = f"a {CRASH_MARKER} vase"
    fault_stack.start_worker("prefork", concurrency=2, app=FAULT_APP)
    sc = Scenario(fault_stack, "poison_prompt", batch_body("faults 6", n, prompts=prompts))
    sc.submit()
    sc.may_fail = {item_id for (item_id,) in fault_stack.query(
        "SELECT id FROM items WHERE batch_id = :b AND seq = :s", b=sc.batch_id, s=poison)}
    wait_until(lambda: fault_stack.worker_deaths() >= 1 or (sc.sample() or {}).get("finished"), 240, interval=0.1,
               what="the poison prompt's first kill")
    running = [i for ids in fault_stack.running_owners(sc.batch_id).values() for i in ids]
    sc.mark_fault("poison prompt killed its worker", running)
    terminal = sc.wait_terminal()
    items = {row.seq: row for row in fault_stack.query(
        "SELECT seq, state, attempts, error FROM items WHERE batch_id = :b", b=sc.batch_id)}
    killer = items[poison]
    if killer.state != "dead":
        sc.failures.append(f"the poison item ended {killer.state} (attempts={killer.attempts}), not dead")
    sc.result.extra["worker_deaths"] = fault_stack.worker_deaths()
    sc.finish(terminal=terminal)


# -- 7: cancel mid-batch -----------------------------------------------------------------------

def test_cancel_mid_batch(fault_stack: FaultStack) -> None:
    fault_stack.start_worker("solo")
    fault_stack.start_worker("prefork", concurrency=2)
    sc = Scenario(fault_stack, "cancel_mid_batch", batch_body("faults 7", batch_items()))
    sc.moved = lambda snap: snap["succeeded"] + snap["cancelled"]  # moving = items reaching an end
    sc.submit()
    sc.wait_mid_batch(need_running=False)
    sc.mark_fault("POST /v1/batches/{id}/cancel", [])
    response = fault_stack.client.post(f"/v1/batches/{sc.batch_id}/cancel", headers=fault_stack.auth())
    if response.status_code != 200:
        sc.failures.append(f"cancel answered {response.status_code}: {response.text[:200]}")
    terminal = sc.wait_terminal()
    states = {state: n for state, n in fault_stack.query(
        "SELECT state, count(*) FROM items WHERE batch_id = :b GROUP BY state", b=sc.batch_id)}
    unexpected = {state: n for state, n in states.items() if state not in ("succeeded", "cancelled")}
    if unexpected:
        sc.failures.append(f"items neither succeeded nor cancelled: {unexpected}")
    if not states.get("cancelled"):
        sc.failures.append(f"nothing was cancelled ({states}): the cancel came too late; raise INSTABATCH_FAULTS_ITEMS")
    batch = fault_stack.api_batch(sc.batch_id) or {}
    if terminal and batch.get("status") != "cancelled":
        sc.failures.append(f"batch status {batch.get('status')!r}, expected 'cancelled'")
    sc.result.extra["cancelled"] = states.get("cancelled", 0)
    sc.finish(terminal=terminal)


# -- 8: API restarted while clients retry with the same Idempotency-Key ------------------------

def test_api_restart_idempotent_submission(fault_stack: FaultStack) -> None:
    fault_stack.start_worker("solo")
    body = batch_body("faults 8", batch_items())
    sc = Scenario(fault_stack, "api_restart_idempotency", body)
    key = f"faults-{uuid.uuid4().hex}"
    sc.idempotency_keys.append(key)
    headers = {**fault_stack.auth(), "Idempotency-Key": key}
    base_url = str(fault_stack.client.base_url)
    first_sent, restarted, stop = threading.Event(), threading.Event(), threading.Event()
    answers: list[tuple[int, int, str]] = []  # (client, status, batch id)
    errors: list[str] = []

    def client(index: int) -> None:
        deadline = time.monotonic() + 240
        after_restart = 0
        with httpx.Client(base_url=base_url, timeout=30) as http:
            while time.monotonic() < deadline and not (stop.is_set() and after_restart):
                try:
                    first_sent.set()
                    response = http.post("/v1/batches", json=body, headers=headers)
                except httpx.HTTPError as error:
                    errors.append(type(error).__name__)
                    time.sleep(0.2)
                    continue
                if response.status_code >= 500:
                    errors.append(str(response.status_code))
                    time.sleep(0.2)
                    continue
                answers.append((index, response.status_code, response.json().get("id", response.text[:100])))
                if restarted.is_set():
                    after_restart += 1
                time.sleep(0.1)

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    submitted = time.monotonic()
    for thread in clients:
        thread.start()
    first_sent.wait(30)
    time.sleep(0.05)  # the first submissions are in flight
    sc.submitted_at = submitted
    sc.fault_at, sc.moved_at_fault = time.monotonic(), 0
    say("scenario=api_restart_idempotency fault: kill -9 the API while 3 clients submit, then start it again")
    fault_stack.api.kill()
    time.sleep(2)
    fault_stack.start_api()
    restarted.set()
    stop.set()
    for thread in clients:
        thread.join(timeout=300)
    ids = {batch_id for _, _, batch_id in answers}
    sc.result.extra.update(answers=len(answers), client_errors=len(errors),
                           created=sum(1 for _, status, _ in answers if status == 202))
    if len(ids) != 1:
        sc.failures.append(f"clients were given {len(ids)} batch ids: {sorted(ids)[:5]}")
    if not answers:
        raise AssertionError(f"no client got an answer: {errors[-5:]}")
    sc.batch_id = sorted(ids)[0]
    sc.finish()


# -- 9: a reviewer's regenerate that kills the worker ------------------------------------------

def test_regenerate_kills_worker(fault_stack: FaultStack) -> None:
    n = min(batch_items(), 12)
    prompts = [f"a ceramic mug, product photo, variant {i}" for i in range(n)]
    prompts[2] = f"a {REGEN_MARKER} teapot"  # generates fine; its regenerate kills the worker
    fault_stack.start_worker("prefork", concurrency=2, app=FAULT_APP)
    sc = Scenario(fault_stack, "regenerate_kills_worker", batch_body("faults 9", n, prompts=prompts, num_images_every=0))
    sc.submit()
    if not sc.wait_terminal():
        sc.finish(terminal=False)
    item_id, image_id = fault_stack.query(
        "SELECT i.id, im.id FROM items i JOIN images im ON im.item_id = i.id WHERE i.batch_id = :b AND i.seq = 2",
        b=sc.batch_id)[0]
    deaths_before = fault_stack.worker_deaths()
    sc.moved = lambda snap: 0
    sc.mark_fault(f"reviewer regenerates image {image_id[:8]} whose prompt kills the worker", [])
    response = fault_stack.client.post(f"/v1/images/{image_id}/review", headers=fault_stack.auth("reviewer"),
                                       json={"decision": "regenerate", "reason_code": "artifact",
                                             "comment": "fault suite: this regenerate kills its worker"})
    assert response.status_code == 200, response.text
    new_image_id = response.json()["regeneration"]["new_image_id"]

    def outcome() -> str | None:
        if fault_stack.query("SELECT 1 FROM images WHERE id = :i", i=new_image_id):
            return "created"
        events = fault_stack.query(
            "SELECT action FROM audit_events WHERE (item_id = :item OR image_id IN (:parent, :new)) "
            "AND action <> 'review.decision' AND ts > now() - interval '1 hour'",
            item=item_id, parent=image_id, new=new_image_id)
        visible = [action for (action,) in events if re.search(r"dead|fail", action)]
        if visible:
            return f"audit:{visible[0]}"
        item = fault_stack.client.get(f"/v1/items/{item_id}", headers=fault_stack.auth("reviewer"), timeout=10)
        if item.status_code == 200 and re.search(r'"(dead|failed)"', item.text):
            return "api:item shows dead/failed"
        return None

    bound = sc.bounds.stall_s
    deadline, seen = time.monotonic() + bound, None
    while time.monotonic() < deadline and seen is None:
        try:
            seen = outcome()
        except Exception:  # noqa: BLE001 - a worker death may coincide with a query
            seen = None
        time.sleep(1.0)
    deaths = fault_stack.worker_deaths() - deaths_before
    sc.result.extra.update(regenerate=(seen or "none").replace(" ", "_"), worker_deaths=deaths)
    if seen == "created":
        sc.failures.append("the regenerate completed: the poison did not apply (did worker/regenerate.py change?)")
    elif seen is None:
        sc.result.extra_stuck = 1
        sc.failures.append(
            f"regenerate of image {image_id[:8]} never ended visibly: in {bound:.0f}s it killed its worker "
            f"{deaths} times and no dead/failed outcome was recorded (audit events, GET /v1/items/{{id}}); "
            f"broker {fault_stack.broker_depths()}")
    else:
        sc.result.recovery_s = time.monotonic() - sc.fault_at
    sc.finish(terminal=True)
