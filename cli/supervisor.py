"""A Celery worker in a child process, as ``instabatch run`` starts it.

A subprocess rather than a worker thread: it is exactly what ``instabatch worker`` runs in
production (same app, same pool, same code path), and a prompt that crashes the process
(a segfault, the OOM killer) takes down the worker, not the command that shows the progress and
writes the results. The command notices, requeues what the dead worker held and starts another.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from worker.app import WORKER_QUEUES

DEFAULT_APP = "worker.celery_app"


def worker_command(pool: str = "solo", concurrency: int = 1, loglevel: str = "WARNING",
                   queues: tuple[str, ...] = WORKER_QUEUES, beat: bool = False, name: str | None = None,
                   app: str = DEFAULT_APP) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool,
               "--concurrency", str(concurrency), "-Q", ",".join(queues), "--loglevel", loglevel]
    if name:
        command += ["-n", name]
    if beat:
        command.append("--beat")
    return command


class WorkerProcess:
    def __init__(self, log_path: Path, env: dict[str, str] | None = None, app: str = DEFAULT_APP):
        self.log_path = log_path
        self.app = app
        self.env = env or dict(os.environ)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The gossip/mingle/heartbeat chatter is for clusters; this worker serves one command.
        command = worker_command(name=f"run-{os.getpid()}-{self.starts}@%h", app=self.app) + [
            "--without-heartbeat", "--without-mingle", "--without-gossip"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def lease_prefix(self) -> str | None:
        """``host:pid`` of the solo worker: the prefix of every lease it takes."""
        return f"{socket.gethostname()}:{self.process.pid}" if self.process else None

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (the running task finishes), then a kill if it takes too long."""
        if not self.alive:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
