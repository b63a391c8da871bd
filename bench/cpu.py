"""CPU throughput of the worker path: ``python -m bench.cpu [--items N] [--micro-batch M] ...``.

Two measurements on the same model and settings, each on a fresh embedded stack (SQLite ledger,
SQLite broker, local object folder) unless DATABASE_URL / BROKER_URL / S3_* point elsewhere:

* ``direct``: the chunk runner called in this process for every outbox chunk (no broker), with
  the seconds spent per stage: generate (+refine), encode, store, qc, ledger;
* ``celery``: the batch published to the broker and run by a real Celery worker (solo pool, in a
  thread of this process), timed from submission to the batch's completion.

Prints ``RESULT name=value`` lines; it never passes or fails on time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("generate", "refine", "encode", "store", "qc", "ledger")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="instabatch-bench-"))
    model = args.model or default_model(workdir)
    print(f"model={model} items={args.items} micro_batch={args.micro_batch} size={args.size} threads={args.threads}")
    if args.mode in ("direct", "both"):
        bench_direct(args, model, workdir / "direct")
    if args.mode in ("celery", "both"):
        bench_celery(args, model, workdir / "celery")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=128, help="prompts in the batch (one image each)")
    parser.add_argument("--micro-batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--chunk", type=int, default=None, help="images per chunk (task); default 4 micro-batches, "
                                                                 "so the worker overlaps them")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny model, "
                                                                  "else a random tiny checkpoint)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the worker "
                        "(INSTABATCH_TORCH_THREADS); on a busy shared CPU more threads can be much slower")
    parser.add_argument("--mode", choices=("direct", "celery", "both"), default="both")
    return parser.parse_args(argv)


def default_model(workdir: Path) -> Path:
    from core.settings import TINY_MODEL_DIR

    if (TINY_MODEL_DIR / "model_index.json").is_file():
        return TINY_MODEL_DIR
    from instaflow.testing import make_random_checkpoint

    return make_random_checkpoint(workdir / "random-checkpoint")


def configure(args: argparse.Namespace, model: Path, var_dir: Path):
    """Settings for one run: env first (so get_settings and the worker agree), caches cleared."""
    from core import db, storage
    from core.migrate import upgrade
    from core.settings import get_settings

    os.environ.update(INSTABATCH_VAR_DIR=str(var_dir), INSTABATCH_MODEL=str(model),
                      INSTABATCH_TORCH_THREADS=str(args.threads),
                      INSTABATCH_MICRO_BATCH=str(args.micro_batch),
                      INSTABATCH_CHUNK_IMAGES=str(args.chunk or 4 * args.micro_batch))
    get_settings.cache_clear()
    db.engine_for.cache_clear()
    storage._store_for.cache_clear()
    settings = get_settings()
    upgrade(settings.database_url)
    return settings


def submit(stack_sessions, args: argparse.Namespace, settings) -> str:
    from core import ledger

    params = {"width": args.size, "height": args.size} if args.size else {}
    items = [ledger.ItemSpec(prompt=f"a ceramic mug, product photo, colour {i % 12}, variant {i}",
                             external_id=f"sku-{i}", seed=i) for i in range(args.items)]
    with stack_sessions() as session:
        batch, _ = ledger.submit_batch(session, ledger.BatchSpec("bench", items, params), team="bench",
                                       actor="bench", chunk_images=settings.chunk_images)
        session.commit()
        return batch.id


def bench_direct(args: argparse.Namespace, model: Path, var_dir: Path) -> None:
    from sqlalchemy import select

    from models import Outbox
    from worker.chunk import ChunkRunner
    from worker.context import WorkerContext

    settings = configure(args, model, var_dir)
    ctx = WorkerContext(settings)
    started = time.perf_counter()
    ctx.model.load()  # once, outside the timed loop (in the device process with INSTABATCH_DEVICE_PROCESS=1)
    print(f"RESULT direct_model_load_s={time.perf_counter() - started:.2f}")
    warm = submit(ctx.sessions, argparse.Namespace(**{**vars(args), "items": args.micro_batch}), settings)
    run_chunks(ctx, warm)  # first passes allocate; not measured

    batch_id = submit(ctx.sessions, args, settings)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    images = 0
    with ctx.sessions() as session:
        chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch_id).order_by(Outbox.id)).all()
    for number, item_ids in enumerate(chunks):
        report = ChunkRunner(ctx, f"bench-{number}").run(item_ids)
        images += report.images
        for stage, value in report.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
    elapsed = time.perf_counter() - started
    print(f"RESULT direct_images={images} direct_seconds={elapsed:.2f} direct_images_per_s={images / elapsed:.2f}")
    for stage in STAGES:
        if stage in seconds:
            rate = images / seconds[stage] if seconds[stage] else float("inf")
            print(f"RESULT stage_{stage}_s={seconds[stage]:.3f} stage_{stage}_images_per_s={rate:.1f} "
                  f"stage_{stage}_share={seconds[stage] / elapsed:.2f}")
    other = elapsed - sum(seconds.values())
    print(f"RESULT stage_other_s={other:.3f} stage_other_share={other / elapsed:.2f}")


def run_chunks(ctx, batch_id: str) -> None:
    from sqlalchemy import select

    from models import Outbox
    from worker.chunk import ChunkRunner

    with ctx.sessions() as session:
        chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch_id)).all()
    for number, item_ids in enumerate(chunks):
        ChunkRunner(ctx, f"warm-{number}").run(item_ids)


def bench_celery(args: argparse.Namespace, model: Path, var_dir: Path) -> None:
    from celery.contrib.testing.worker import start_worker

    from core import ledger
    from core.dispatch import dispatch_pending
    from worker.app import create_app

    settings = configure(args, model, var_dir)
    app = create_app(settings)
    ctx = app.instabatch
    ctx.model.load()  # the worker's model, loaded before the clock starts
    with start_worker(app, perform_ping_check=False, shutdown_timeout=120, loglevel="ERROR"):
        batch_id = submit(ctx.sessions, args, settings)
        started = time.perf_counter()
        dispatch_pending(ctx.sessions, app)
        while True:
            with ctx.sessions() as session:
                counts = ledger.state_counts(session, [batch_id])[batch_id]
            if counts["queued"] + counts["running"] == 0:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    done = counts["succeeded"]
    broker = settings.broker_url.split(":", 1)[0]
    print(f"RESULT celery_broker={broker} celery_images={done} celery_seconds={elapsed:.2f} "
          f"celery_images_per_s={done / elapsed:.2f}")


if __name__ == "__main__":
    sys.exit(main())
