"""A scenario's life: submit, wait until mid-batch, inject the fault, watch the ledger, check, report.

Measured on the ledger, sampled every half second:

- ``recovery_s``: fault injected -> the batch moving again (its succeeded count rises above the
  count at the fault; a scenario may measure another signal, e.g. a visible regenerate outcome);
- ``inflight_s``: fault -> every item that was running at the fault is terminal;
- ``total_s``: submission -> every item terminal.

Every wait is bounded (:class:`tests.faults.stack.Bounds`): an item not terminal after ``hard_s``,
or a batch with no change at all for ``stall_s``, is *stuck*, and the scenario fails with a
diagnosis of where its items are. A scenario fails on lost, duplicated or stuck items (or any
other broken invariant), never on a timing.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.faults import invariants
from tests.faults.services import wait_until
from tests.faults.stack import ACTIVE, Bounds, FaultStack, images_of

RESULTS: list["ScenarioResult"] = []
SAMPLE_S = 0.5


def mode() -> str:
    """``full`` (make faults), ``short`` (the default: scenarios 2, 3 and 6 on small batches) or ``off``."""
    return os.environ.get("INSTABATCH_FAULTS", "short").strip().lower() or "short"


def batch_items() -> int:
    if mode() == "full":
        return int(os.environ.get("INSTABATCH_FAULTS_ITEMS", "120"))
    return int(os.environ.get("INSTABATCH_FAULTS_SHORT_ITEMS", "64"))


@dataclass
class ScenarioResult:
    name: str
    items: int
    recovery_s: float | None = None
    inflight_s: float | None = None
    total_s: float | None = None
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    chain_ok: bool = False
    orphans: int = 0
    ok: bool = False
    diagnosis: str = ""
    extra_stuck: int = 0  # stuck work that is not an item (a regenerate that never ends)
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        def fmt(value: float | None) -> str:
            return "none" if value is None else f"{value:.1f}"
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (f"RESULT scenario={self.name} items={self.items} recovery_s={fmt(self.recovery_s)} "
                f"lost={self.lost} duplicated={self.duplicated} stuck={self.stuck} inflight_s={fmt(self.inflight_s)} "
                f"total_s={fmt(self.total_s)} chain_ok={str(self.chain_ok).lower()} orphans={self.orphans}{extra} "
                f"ok={str(self.ok).lower()}")


def summary_line(results: list[ScenarioResult]) -> str:
    recoveries = [r.recovery_s for r in results if r.recovery_s is not None]
    return (f"RESULT scenarios={len(results)} items={sum(r.items for r in results)} "
            f"lost={sum(r.lost for r in results)} duplicated={sum(r.duplicated for r in results)} "
            f"stuck={sum(r.stuck for r in results)} chain_ok={str(all(r.chain_ok for r in results)).lower()} "
            f"max_recovery_s={f'{max(recoveries):.1f}' if recoveries else 'none'} "
            f"failed={sum(not r.ok for r in results)}")


def say(message: str) -> None:
    print(f"faults: {time.strftime('%H:%M:%S')} {message}", flush=True)


class Scenario:
    """One batch through the stack with one fault; see the module docstring for what is measured."""

    def __init__(self, stack: FaultStack, name: str, body: dict[str, Any]):
        self.stack = stack
        self.name = name
        self.body = body
        self.bounds = Bounds.of(stack.settings, images_of(body))
        self.result = ScenarioResult(name=name, items=len(body["items"]))
        self.batch_id: str | None = None
        self.submitted_at: float | None = None
        self.fault_at: float | None = None
        self.moved_at_fault: int | None = None
        self.inflight: list[str] = []
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.idempotency_keys: list[str] = []
        self.may_fail: set[str] = set()  # item ids allowed to end failed/dead (a poison); any other is lost
        self.failures: list[str] = []
        self.moved: Callable[[dict[str, int]], int] = lambda snap: snap["succeeded"]
        say(f"scenario={name} items={len(body['items'])} images={images_of(body)} lease={self.bounds.lease_s:.0f}s "
            f"sweep={self.bounds.sweep_s:.0f}s stall_bound={self.bounds.stall_s:.0f}s hard_bound={self.bounds.hard_s:.0f}s")

    # -- steps -------------------------------------------------------------------------

    def submit(self, idempotency_key: str | None = None) -> str:
        self.submitted_at = time.monotonic()
        batch = self.stack.submit(self.body, idempotency_key=idempotency_key)
        self.batch_id = batch["id"]
        return self.batch_id

    def sample(self) -> dict[str, int] | None:
        try:
            snap = self.stack.snapshot(self.batch_id)
        except Exception:  # noqa: BLE001 - PostgreSQL may be down on purpose
            return None
        if self.inflight:
            try:
                snap["inflight_active"] = int(self.stack.query(
                    "SELECT count(*) FROM items WHERE id = ANY(:ids) AND state IN ('queued', 'running')",
                    ids=self.inflight)[0][0])
            except Exception:  # noqa: BLE001
                pass
        self.samples.append((time.monotonic(), snap))
        return snap

    def wait_mid_batch(self, need_running: bool = True, timeout: float = 240.0,
                       ready: Callable[[dict[str, int]], bool] | None = None) -> dict[str, int]:
        """Until some items succeeded and (for kills) some are running; fails if the batch ends first."""
        deadline = time.monotonic() + timeout
        ready = ready or (lambda snap: snap["succeeded"] >= 1 and (snap["running"] >= 1 or not need_running))
        while time.monotonic() < deadline:
            snap = self.sample()
            if snap is not None:
                if ready(snap):
                    return snap
                if snap["finished"] or not any(snap[state] for state in ACTIVE):
                    raise AssertionError(f"{self.name}: the batch ended before the fault could be injected "
                                         f"({snap}); raise INSTABATCH_FAULTS_ITEMS")
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: batch not moving {timeout:.0f}s after submission: "
                             f"{self.stack.diagnose(self.batch_id)}\n{self.stack.log_excerpt()}")

    def wait_chunk_running(self, pids: Callable[[], Iterable[int]] | None = None,
                           timeout: float = 240.0) -> tuple[int, list[str]]:
        """Mid-batch, then until a live worker process (one of ``pids()``; by default any worker or
        pool child of the stack) holds running items of the batch: (its pid, those items).

        The fault then lands on a chunk in flight (claimed, a micro-batch rendering or recording),
        not in the gap between two chunks, which is the case an outage or a kill must survive."""
        self.wait_mid_batch(need_running=False, timeout=timeout)
        pids = pids or self.stack.worker_pids

        def holder() -> tuple[int, list[str]] | None:
            snap = self.sample()
            if snap is not None and snap["finished"]:
                raise AssertionError(f"{self.name}: the batch ended before the fault; raise INSTABATCH_FAULTS_ITEMS")
            candidates = set(pids())
            for owner, item_ids in self.stack.running_owners(self.batch_id).items():
                pid = FaultStack.owner_pid(owner)
                if pid in candidates:
                    return pid, item_ids
            return None
        return wait_until(holder, timeout, interval=0.05, what=f"{self.name}: a worker process holding running items")

    def mark_fault(self, label: str, inflight: list[str] | None = None) -> None:
        snap = self.sample() or (self.samples[-1][1] if self.samples else {"succeeded": 0})
        self.fault_at = time.monotonic()
        self.moved_at_fault = self.moved(snap)
        self.inflight = list(inflight or [])
        self.result.extra.setdefault("in_flight_at_fault", len(self.inflight))
        say(f"scenario={self.name} fault: {label} (at {snap}, {len(self.inflight)} items in flight)")

    def wait_terminal(self) -> bool:
        """Until every item is terminal and the batch finished; False when stuck (see Bounds)."""
        start = time.monotonic()
        hard_deadline = (self.fault_at or start) + self.bounds.hard_s
        last_change, last_signature, last_report = time.monotonic(), None, 0.0
        while True:
            snap = self.sample()
            now = time.monotonic()
            if snap is not None:
                signature = tuple(sorted(snap.items()))
                if signature != last_signature:
                    last_signature, last_change = signature, now
                if not any(snap[state] for state in ACTIVE) and snap["finished"]:
                    return True
            if now - last_report > 30:
                say(f"scenario={self.name} waiting: {snap if snap is not None else 'ledger unreachable'}")
                last_report = now
            if now - last_change > self.bounds.stall_s:
                self.result.diagnosis = f"no change at all for {now - last_change:.0f}s (stall bound {self.bounds.stall_s:.0f}s)"
                return False
            if now > hard_deadline:
                self.result.diagnosis = f"not terminal {self.bounds.hard_s:.0f}s after the fault (hard bound)"
                return False
            time.sleep(SAMPLE_S)

    # -- measures and the verdict ------------------------------------------------------

    def measure(self) -> None:
        if self.fault_at is not None:
            for t, snap in self.samples:
                if t >= self.fault_at and self.moved(snap) > (self.moved_at_fault or 0):
                    self.result.recovery_s = t - self.fault_at
                    break
            if self.inflight:
                for t, snap in self.samples:
                    if t >= self.fault_at and snap.get("inflight_active", 1) == 0:
                        self.result.inflight_s = t - self.fault_at
                        break
        last = self.samples[-1][1] if self.samples else None
        if last is not None and not any(last[state] for state in ACTIVE) and self.submitted_at is not None:
            done = next(t for t, snap in self.samples if not any(snap[state] for state in ACTIVE))
            self.result.total_s = done - self.submitted_at

    def finish(self, batch_ids: list[str] | None = None, terminal: bool | None = None) -> ScenarioResult:
        """Wait (bounded), check every invariant, record the RESULT line; raise if anything broke."""
        if terminal is None:
            terminal = self.wait_terminal()
        self.measure()
        stuck_diagnosis = "" if terminal else self.stack.diagnose(self.batch_id)
        try:
            report = invariants.check(self.stack, batch_ids or [self.batch_id], idempotency_keys=self.idempotency_keys,
                                      may_fail=self.may_fail)
        except Exception as error:  # noqa: BLE001 - still report the scenario
            report = invariants.InvariantReport(chain=f"checker failed: {type(error).__name__}: {error}")
            self.failures.append(f"invariant checker failed: {type(error).__name__}: {error}")
        r = self.result
        r.lost, r.duplicated = len(report.lost), len(report.duplicated)
        r.stuck = len(report.stuck) + r.extra_stuck
        r.chain_ok, r.orphans = report.chain_ok, len(report.orphans)
        r.extra.setdefault("states", ",".join(f"{k}:{v}" for k, v in sorted(report.states.items())))
        r.ok = report.ok and not self.failures
        problems = report.problems()
        details = [d for d in (r.diagnosis, stuck_diagnosis, "" if problems == "none" else problems, *self.failures) if d]
        r.diagnosis = " || ".join(details)
        RESULTS.append(r)
        say(r.line() + (f"\n  diagnosis: {r.diagnosis}" if r.diagnosis else ""))
        if not r.ok:
            raise AssertionError(f"scenario {self.name} failed: {r.diagnosis}\n{self.stack.log_excerpt()}")
        return r
