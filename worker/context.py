"""What one worker process holds: settings, ledger sessions, the object store, the engine, QC.

Everything is created lazily and per process: a forked child never reuses its parent's
database connections, and the model is loaded in the process that runs tasks.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, session_factory
from core.retry import with_retry
from core.settings import Settings
from core.storage import ObjectStore, make_store
from qc.checker import QualityChecker
from qc.screening import ScreeningPolicy, screen_prompt
from worker.device import DeviceProcess
from worker.model_runner import ModelRunner
from worker.pipeline import make_encoder_pool, may_have_children
from worker.sealing import Sealer

log = logging.getLogger(__name__)
UPLOAD_THREADS = 8
T = TypeVar("T")


class WorkerContext:
    def __init__(self, settings: Settings, celery: Celery | None = None):
        self.settings = settings
        self.celery = celery
        self._pid: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._sessions: sessionmaker[Session] | None = None
        self._store: ObjectStore | None = None
        self._model: ModelRunner | DeviceProcess | None = None
        self._checker: QualityChecker | None = None
        self._screening: ScreeningPolicy | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self._sealer: Sealer | None = None
        self._encoders: Executor | None = None
        self._single_threads: dict[str, ThreadPoolExecutor] = {}  # by thread name prefix

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    @property
    def sessions(self) -> sessionmaker[Session]:
        self._this_process()
        if self._sessions is None:
            self._sessions = session_factory(make_engine(self.settings.database_url))
        return self._sessions

    @property
    def store(self) -> ObjectStore:
        self._this_process()
        if self._store is None:
            self._store = make_store(self.settings)
        return self._store

    @property
    def uploads(self) -> ThreadPoolExecutor:
        """Threads that write a micro-batch's objects to the store in parallel."""
        self._this_process()
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload")
        return self._uploads

    @property
    def encoders(self) -> Executor:
        """Threads (or processes) that encode a micro-batch's images in parallel."""
        self._this_process()
        if self._encoders is None:
            self._encoders = make_encoder_pool(self.settings.encode_pool, self.settings.encode_workers)
        return self._encoders

    @property
    def finisher(self) -> ThreadPoolExecutor:
        """The one thread that finishes micro-batches (encode, store, check, record) in order while
        the device renders the next (worker/pipeline.py)."""
        return self._single_thread("finish")

    @property
    def ahead_thread(self) -> ThreadPoolExecutor:
        """The one thread that encodes the next pass's prompts while the device runs the current one."""
        return self._single_thread("ahead")

    @property
    def qc_thread(self) -> ThreadPoolExecutor:
        """The one thread that runs QC on a micro-batch while the finishing thread encodes and stores it."""
        return self._single_thread("qc")

    def _single_thread(self, name: str) -> ThreadPoolExecutor:
        """A one-thread executor of this process, made on first use: work on it runs in submission order."""
        self._this_process()
        if name not in self._single_threads:
            self._single_threads[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return self._single_threads[name]

    @property
    def model(self) -> ModelRunner | DeviceProcess:
        self._this_process()
        if self._model is None:
            self._model = self._device_process() or ModelRunner(self.settings)
        return self._model

    def _device_process(self) -> DeviceProcess | None:
        if not self.settings.device_process:
            return None
        if may_have_children():
            return DeviceProcess(self.settings)
        log.warning("INSTABATCH_DEVICE_PROCESS=1 in a daemonic process (prefork child): the model runs in it")
        return None

    @property
    def sealer(self) -> Sealer:
        """Content Credentials (worker/sealing.py); the worker app builds it at start, so a missing
        signing key stops the worker there rather than failing every item."""
        self._this_process()
        if self._sealer is None:
            self._sealer = Sealer(self.settings)
        return self._sealer

    @property
    def quality_checker(self) -> QualityChecker:
        self._this_process()
        if self._checker is None:
            self._checker = QualityChecker()
        return self._checker

    @property
    def screening_policy(self) -> ScreeningPolicy:
        self._this_process()
        if self._screening is None:
            self._screening = ScreeningPolicy.from_settings()
        return self._screening

    def retry(self, work: Callable[[], T], *, what: str) -> T:
        """``work()``, retried with backoff while the database or the object store does not answer."""
        return with_retry(work, budget_seconds=self.settings.infra_retry_seconds, what=what)

    def in_ledger(self, work: Callable[[Session], T], *, what: str) -> T:
        """``work(session)`` in a transaction of its own, committed; retried whole on a transient error."""
        def unit() -> T:
            with self.sessions() as session:
                result = work(session)
                session.commit()
                return result

        return self.retry(unit, what=what)

    def screen(self, prompt: str) -> str | None:
        """Why a prompt must not be generated, or None when it may be."""
        result = screen_prompt(prompt, self.screening_policy)
        if result.allowed:
            return None
        return f"prompt blocked by screening: {result.reason}" + (f" ({result.detail})" if result.detail else "")


def worker_identity() -> str:
    """host:pid, the prefix of every lease this process takes."""
    return f"{socket.gethostname()}:{os.getpid()}"
