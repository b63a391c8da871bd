"""The model in a process of its own (``INSTABATCH_DEVICE_PROCESS=1``): the worker's Python threads then
never hold the GIL its device loop needs.

Every torch call gives the GIL up while its kernel runs and must take it back before the next; beside
a busy Python thread (QC, boto3 uploads, the ledger) that wait is up to the interpreter's switch
interval, 5 ms, per call. Measured with ``python -m bench.gil``: the tiny model made 116 images/s alone
and 4.6 beside one busy Python thread of its process, 96 beside a busy process (docs/performance.md).
The device process runs a :class:`~worker.model_runner.ModelRunner`; the worker calls it through a pipe
(prompts and seeds go, images come back as pickled PIL images: 12 KB each at 64², 0.8 MB at 512²).

One call at a time (a lock): the chunk's thread generates, the ``ahead`` thread encodes the next
prompts; they take turns. A call that does not come back whole (the process died, or the task's time
limit interrupted the wait) leaves the pipe out of step: the process is stopped and the next call starts
a fresh one, which loads its models again. The process's model loads and its CUDA memory come back
with each answer into this process's metrics (``instabatch_model_loads_total``,
``instabatch_gpu_memory_bytes``), which this process serves.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any

from core.settings import Settings
from worker import metrics

log = logging.getLogger(__name__)


class DeviceProcessDied(RuntimeError):
    """The device process ended in the middle of a call (killed, or a crash in native code)."""


class DeviceProcess:
    """A ModelRunner in a spawned child process, with the runner's methods the image steps call."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._process: Any = None
        self._connection: Connection | None = None
        self.starts = 0  # processes started: more than one means one died or was stopped

    # -- the runner's interface (worker/model_runner.py) --------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("generate", *args, **kwargs)

    def load(self, name: str | None = None) -> None:
        self._call("load", name)

    def identity(self, name: str | None = None) -> dict[str, str]:
        return self._call("identity", name)

    def encode_ahead(self, *args: Any, **kwargs: Any) -> None:
        self._call("encode_ahead", *args, **kwargs)

    def refiner_identity(self) -> dict[str, str]:
        return self._call("refiner_identity")

    def free_cache(self) -> None:
        self._call("free_cache")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the pipe -----------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            connection = self._connection if self._alive() else self._start()
            try:
                connection.send((method, args, kwargs))
                ok, value, loads, gpu_bytes = connection.recv()
            except (EOFError, OSError) as error:
                self._stop()
                raise DeviceProcessDied(f"the device process ended during {method}: {error!r}") from error
            except BaseException:  # the time limit interrupted the wait: its answer would answer the next call
                self._stop()
                raise
        for name, seconds in loads:
            metrics.model_loaded(seconds, name)
        if gpu_bytes is not None:
            metrics.set_gpu_memory(gpu_bytes)
        if ok:
            return value
        raise value

    def _alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> Connection:
        self._stop()
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._connection, child = context.Pipe()
        self._process = context.Process(target=serve, args=(child, self.settings), name="instabatch-device",
                                        daemon=True)
        self._process.start()
        child.close()
        self.starts += 1
        log.info("started the device process (pid %d)", self._process.pid)
        return self._connection

    def _stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
            self._process = None


def serve(connection: Connection, settings: Settings) -> None:
    """The device process: answer calls on the runner until the worker closes its end."""
    from worker.model_runner import ModelRunner

    runner = ModelRunner(settings)
    while True:
        try:
            method, args, kwargs = connection.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        try:
            reply = (True, getattr(runner, method)(*args, **kwargs))
        except Exception as error:  # the caller decides: out of memory splits, the rest is the item's error
            reply = (False, error)
        loads, runner.load_events = runner.load_events, []
        gpu_bytes = metrics.gpu_memory_allocated()
        try:
            connection.send((*reply, loads, gpu_bytes))
        except Exception as error:  # an answer that does not pickle: say what it was
            connection.send((False, RuntimeError(f"{type(error).__name__}: {error}"), loads, gpu_bytes))
