"""Overlapped stages (docs/architecture.md, "Overlapped stages"): the device renders micro-batch
k+1 while one finishing thread encodes, stores, checks and records micro-batch k.

:class:`Overlap` keeps at most ``depth`` micro-batches rendered but unfinished: a full pipeline
makes the device wait (back-pressure), so memory stays flat however long the chunk. Finishing
runs on ONE thread per worker process, in submission order: records reach the ledger in the
order the device made them, and the duplicate check of micro-batch k sees k-1.

:func:`make_encoder_pool` is where images become bytes in parallel: threads by default (Pillow
releases the GIL while zlib, libwebp and libjpeg work), or spawned processes
(``INSTABATCH_ENCODE_POOL=process``; docs/performance.md compares the two).
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class Overlap:
    """Runs finishing work on ``executor`` with at most ``depth`` jobs in flight.

    ``submit`` blocks while the pipeline is full and raises the error of any job it waited for;
    leaving the ``with`` block waits for every job. Leaving it on an error waits too (without
    raising theirs): the caller gives back what it holds only once no job can still record it.
    """

    def __init__(self, executor: Executor, depth: int):
        self._executor = executor
        self._depth = depth  # 0: no overlap, each job runs on the caller's thread (the benchmark's "naive")
        self._pending: deque[Future[Any]] = deque()

    def submit(self, work: Callable[[], Any]) -> None:
        if self._depth == 0:
            work()
            return
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._executor.submit(work))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _abandon(self) -> None:
        while self._pending:
            future = self._pending.popleft()
            if future.exception() is not None:
                log.warning("finishing a micro-batch failed too: %s", future.exception())

    def __enter__(self) -> "Overlap":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.drain()
        else:
            self._abandon()


def may_have_children() -> bool:
    """False in a daemonic process (a Celery prefork child): it cannot start processes of its own."""
    return not multiprocessing.current_process().daemon


def make_encoder_pool(kind: str, workers: int) -> Executor:
    """Threads, or spawned processes; a daemonic process (a Celery prefork child) cannot have
    children, so it falls back to threads there."""
    if kind == "process":
        if may_have_children():
            return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        log.warning("INSTABATCH_ENCODE_POOL=process in a daemonic process (prefork child): using threads")
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")
