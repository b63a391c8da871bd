"""Where the worker's CPU goes, per image and per component: ``python -m bench.profile [--items 256]``.

A Celery worker (solo pool, in a thread of this process) runs one batch of the tiny model through
the real path (Redis → Celery → chunk runner → QC → S3 over HTTP (moto server) → PostgreSQL), on
private services like ``make bench`` (bench/main.py). The worker's functions are wrapped with
per-thread CPU clocks (``time.thread_time``), each component counting its own time only (a wrapped
call inside another is the inner one's), on whatever thread it runs: the finishing, QC, encoder
and upload threads included. What the process spent outside every wrapped function is Celery,
kombu, the chunk runner's glue and the interpreter: ``other``.

CPU time, unlike wall time, does not move with the load other users put on a shared machine, so
the table is comparable between runs minutes apart. The servers' CPU is read from /proc: the moto
server and redis-server (our own processes), and the PostgreSQL backends serving our database.

``--sim-ms 4 --size 512`` replaces the model with the device-speed simulation (bench/sim.py): the
512² path, where the watermark runs.

Prints ``RESULT`` lines; it never passes or fails on time.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from bench.load import fresh_database
from bench.main import PROMPT, cpu_seconds, create_bucket, moto_s3, private_redis, stack_env


class CpuLedger:
    """Exclusive CPU seconds per component, from per-thread clocks (a nested component's time is its own)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._lock = threading.Lock()

    def wrap(self, name: str | Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs) if callable(name) else name
            stack = self._local.__dict__.setdefault("stack", [])
            frame = [time.thread_time(), 0.0]  # start, time of wrapped calls inside
            stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                stack.pop()
                elapsed = time.thread_time() - frame[0]
                if stack:
                    stack[-1][1] += elapsed
                with self._lock:
                    self.seconds[label] += elapsed - frame[1]
                    self.calls[label] += 1
        return timed

    def patch(self, owner: Any, attribute: str, name: str | Callable[..., str]) -> None:
        setattr(owner, attribute, self.wrap(name, getattr(owner, attribute)))

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()


def instrument(ledger: CpuLedger) -> None:
    """Wrap the worker's components (before the worker app is built, so its imports see the wrappers)."""
    import core.credentials
    import core.webhooks
    import core.watermark
    import worker.chunk
    import worker.sealing
    import worker.steps
    from core.storage import S3ObjectStore
    from instaflow.pipeline import InstaFlowPipeline
    from qc.checker import QualityChecker
    from qc.images import ImageView
    from worker import logo
    from worker.context import WorkerContext
    from worker.duplicates import LedgerHashIndex
    from worker.model_runner import ModelRunner

    ledger.patch(ModelRunner, "generate", "generate: other (noise, padding, to PIL)")
    ledger.patch(InstaFlowPipeline, "encode_prompts", "generate: text encoder")
    ledger.patch(InstaFlowPipeline, "encode_ahead", "generate: text encoder (ahead)")
    ledger.patch(InstaFlowPipeline, "integrate", "generate: unet")
    ledger.patch(InstaFlowPipeline, "decode", "generate: vae decode")
    ledger.patch(logo, "stamp", "logo stamp")
    ledger.patch(worker.steps, "provenance", "provenance record")
    ledger.patch(QualityChecker, "_run", lambda self, scorer, *_: f"qc: {scorer.name}")
    ledger.patch(QualityChecker, "check", "qc: other (outcomes, thresholds)")
    ledger.patch(ImageView, "__init__", "qc: image view")
    ledger.patch(LedgerHashIndex, "nearest", "qc: duplicate look-up (ledger)")
    ledger.patch(core.watermark, "embed", "watermark")
    ledger.patch(worker.sealing, "encode_image", "encode (format, provenance)")
    ledger.patch(worker.sealing.Signing, "sign", "c2pa sign")
    ledger.patch(S3ObjectStore, "put", "upload (boto3)")
    ledger.patch(WorkerContext, "in_ledger", lambda self, work, *, what: f"ledger: {what}")
    ledger.patch(WorkerContext, "screen", "prompt screening")
    ledger.patch(worker.chunk, "complete_if_done", "batch completion")
    ledger.patch(worker.chunk, "dispatch_pending", "dispatch from outbox")
    ledger.patch(core.webhooks, "enqueue_for_batch", "ledger: image.flagged deliveries")
    del core.credentials  # imported so Signing.sign's module is loaded


def postgres_backends(database_url: str) -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL backend connected to our database."""
    from sqlalchemy import create_engine, text

    from core.db import normalize_url

    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as conn:
            me = conn.scalar(text("select pg_backend_pid()"))
            pids = conn.scalars(text("select pid from pg_stat_activity where datname = current_database()")).all()
    finally:
        engine.dispose()
    cpu = {}
    for pid in pids:
        if pid == me:
            continue
        try:
            cpu[pid] = cpu_seconds(pid)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    return cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="instabatch-profile-"))
    try:
        with private_redis(workdir) as (redis_url, redis_pid), moto_s3(workdir) as (s3_url, s3_pid), \
                fresh_database() as database_url:
            env = stack_env(args, database_url, redis_url, s3_url, workdir)
            create_bucket(s3_url)
            os.environ.update(env)
            run(args, database_url, {"s3 (moto)": s3_pid, "redis": redis_pid})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's, 64)")
    parser.add_argument("--sim-ms", type=float, default=None,
                        help="replace the model with the simulation engine at this device time per image")
    parser.add_argument("--format", default="png", help="output format of the batch: png, webp, jpeg")
    parser.set_defaults(submit_items=0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, database_url: str, services: dict[str, int]) -> None:
    from celery.contrib.testing.worker import start_worker

    from bench.main import _clear_caches
    from core import ledger as core_ledger
    from core.dispatch import dispatch_pending
    from core.settings import get_settings
    from worker.app import create_app

    cpu = CpuLedger()
    instrument(cpu)
    _clear_caches()
    settings = get_settings()
    app = create_app(settings)
    ctx = app.instabatch
    if args.sim_ms is not None:
        from bench.sim import SimulatedEngine

        ctx._model = SimulatedEngine(args.sim_ms / 1000)
    ctx.model.load()
    params: dict[str, Any] = {"output": {"format": args.format}}
    if args.size:
        params.update(width=args.size, height=args.size)

    def submit(count: int, name: str) -> str:
        specs = [core_ledger.ItemSpec(prompt=PROMPT.format(colour=n % 12, n=n), external_id=f"sku-{n}", seed=n)
                 for n in range(count)]
        with ctx.sessions() as session:
            batch, _ = core_ledger.submit_batch(session, core_ledger.BatchSpec(name, specs, params), team="bench",
                                                actor="bench", chunk_images=settings.chunk_images)
            session.commit()
        dispatch_pending(ctx.sessions, app, settings)
        return batch.id

    def wait(batch_id: str) -> dict[str, int]:
        while True:
            with ctx.sessions() as session:
                counts = core_ledger.state_counts(session, [batch_id])[batch_id]
            if counts["queued"] + counts["running"] == 0:
                return counts
            time.sleep(0.1)

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=120, loglevel="ERROR"):
        wait(submit(args.chunk, "warm-up"))  # pools, connections, caches, the judge
        cpu.reset()
        servers_before = {label: cpu_seconds(pid) for label, pid in services.items()}
        pg_before = postgres_backends(database_url)
        wall, process = time.perf_counter(), time.process_time()
        counts = wait(submit(args.items, "profile"))
        wall, process = time.perf_counter() - wall, time.process_time() - process
        pg_after = postgres_backends(database_url)
        servers = {label: cpu_seconds(pid) - servers_before[label] for label, pid in services.items()}
    images = counts["succeeded"]
    servers["postgres (our backends)"] = sum(value - pg_before.get(pid, 0.0) for pid, value in pg_after.items())
    report(args, images, wall, process, cpu, servers)


def report(args: argparse.Namespace, images: int, wall: float, process: float, cpu: CpuLedger,
           servers: dict[str, float]) -> None:
    per_image = 1000 / max(images, 1)
    accounted = sum(cpu.seconds.values())
    # Everything the process spent that no wrapped component did: Celery, kombu, glue, interpreter.
    rows = sorted(cpu.seconds.items(), key=lambda row: -row[1]) + [("other (celery, kombu, glue)", process - accounted)]
    print(f"profile: images={images} wall_s={wall:.2f} images_per_s={images / wall:.1f} size={args.size or 'model'} "
          f"sim_ms={args.sim_ms} format={args.format} load={os.getloadavg()[0]:.2f}")
    print(f"{'component':45s} {'cpu ms/image':>12s} {'share':>6s} {'calls':>7s}")
    for name, seconds in rows:
        print(f"{name:45s} {seconds * per_image:12.2f} {seconds / process:6.1%} {cpu.calls.get(name, 0):7d}")
    print(f"{'worker process total':45s} {process * per_image:12.2f}")
    for name, seconds in servers.items():
        print(f"{'server: ' + name:45s} {seconds * per_image:12.2f}")
    print(f"RESULT profile_images={images} profile_images_per_s={images / wall:.1f} "
          f"profile_worker_cpu_ms_per_image={process * per_image:.2f} " + " ".join(
              f"profile_{key}_cpu_ms_per_image={seconds * per_image:.2f}"
              for key, seconds in (("s3", servers.get("s3 (moto)", 0)), ("redis", servers.get("redis", 0)),
                                   ("postgres", servers.get("postgres (our backends)", 0)))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
