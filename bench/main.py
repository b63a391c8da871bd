"""``make bench``: the worker path's throughput, all in one run, as ``RESULT`` lines (issue 11).

On private services (a redis-server and a moto S3 server on free loopback ports, a fresh
PostgreSQL database on the shared server, dropped at the end):

* ``model_only``: the engine loop alone (ModelRunner.generate at the worker's micro-batch);
* ``end_to_end``: ``--items`` images through the API (``instabatch serve``) → Redis → a Celery
  worker process (solo) → QC → S3 → PostgreSQL, from the POST to the last item succeeded, with
  the worker's peak and sampled RSS;
* ``naive``: the same batch with chunks of one item, one image per pass, no overlap;
* ``sim512``: the chunk runner in this process with the device-speed simulation engine
  (``bench/sim.py``, ``--device-ms`` per image) at 512² in each output format, on the same
  PostgreSQL and S3: images/s, images per CPU-second (per core) and the cores a GPU worker needs;
  threads against processes for encoding;
* ``submit_10k``: p50 of ``POST /v1/batches`` with 10,000 items over ``--submit-runs`` runs.

The last line sums it up::

    RESULT e2e_over_model=… e2e_over_naive=… submit_10k_p50_s=… worker_rss_mb=… sim512_images_per_s=… sim512_format=…

It prints figures and never passes or fails on time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import REPO_ROOT, api_server, create_submitter_key, free_port, fresh_database

BUCKET = "bench-images"
PROMPT = "a ceramic mug, product photo, colour {colour}, variant {n}"
WORKER_QUEUES = "generate.high,generate,generate.low,maintenance"
SIM_FORMATS = (("png", 6, 90), ("png", 1, 90), ("webp", 6, 90), ("jpeg", 6, 92))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="instabatch-bench-"))
    print(f"bench: items={args.items} naive_items={args.naive_items} micro_batch={args.micro_batch} "
          f"chunk={args.chunk} depth={args.depth} device_ms={args.device_ms} workdir={workdir}", flush=True)
    try:
        with private_redis(workdir) as (redis_url, redis_pid), moto_s3(workdir) as (s3_url, s3_pid), \
                fresh_database() as database_url:
            env = stack_env(args, database_url, redis_url, s3_url, workdir)
            create_bucket(s3_url)
            summary = run_all(args, env, workdir, {"s3": s3_pid, "redis": redis_pid})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("RESULT " + " ".join(f"{name}={value}" for name, value in summary.items()), flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="end_to_end and model_only images")
    parser.add_argument("--naive-items", type=int, default=1000,
                        help="naive images (its rate is what counts; 2,000 one-item tasks take minutes here)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64, help="images per chunk (task) in end_to_end")
    parser.add_argument("--depth", type=int, default=2, help="INSTABATCH_PIPELINE_DEPTH of the worker")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--device-process", type=int, choices=(0, 1), default=1,
                        help="INSTABATCH_DEVICE_PROCESS of the end_to_end and naive workers (worker/device.py)")
    parser.add_argument("--encode-pool", choices=("thread", "process"), default="thread",
                        help="INSTABATCH_ENCODE_POOL of the end_to_end and naive workers")
    parser.add_argument("--device-ms", type=float, default=4.0, help="simulated device time per 512² image")
    parser.add_argument("--sim-items", type=int, default=384, help="images per format in sim512")
    parser.add_argument("--submit-items", type=int, default=10_000)
    parser.add_argument("--submit-runs", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: model,e2e,naive,sim,submit")
    args = parser.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def run_all(args: argparse.Namespace, env: dict[str, str], workdir: Path, services: dict[str, int]) -> dict[str, str]:
    os.environ.update(env)
    _clear_caches()
    summary: dict[str, str] = {}
    model_rate = bench_model_only(args) if "model" not in args.skip else float("nan")
    with api_server(env["DATABASE_URL"], env["BROKER_URL"], workdir, env) as (url, api, _):
        key = create_submitter_key(env["DATABASE_URL"], team="bench")
        e2e = bench_end_to_end(url, key, env, workdir, args.items, naive=False, args=args,
                               others={**services, "api": api.pid}) if "e2e" not in args.skip else None
        with api_server(env["DATABASE_URL"], env["BROKER_URL"], workdir,
                        {**env, "INSTABATCH_CHUNK_IMAGES": "1"}) as (naive_url, naive_api, _):
            naive = bench_end_to_end(naive_url, key, env, workdir, args.naive_items, naive=True, args=args,
                                     others={**services, "api": naive_api.pid}) if "naive" not in args.skip else None
        sim = bench_simulated(args) if "sim" not in args.skip else {}
        submit_p50 = bench_submit(url, key, args) if "submit" not in args.skip else float("nan")
    if e2e:
        summary["e2e_over_model"] = f"{e2e.rate / model_rate:.2f}"
        summary["e2e_over_naive"] = f"{e2e.rate / naive.rate:.2f}" if naive else "nan"
    summary["submit_10k_p50_s"] = f"{submit_p50:.3f}"
    summary["worker_rss_mb"] = f"{e2e.peak_rss_mb:.0f}" if e2e else "nan"
    if sim:
        best = max(sim, key=lambda name: sim[name])
        summary["sim512_images_per_s"] = f"{sim[best]:.1f}"
        summary["sim512_format"] = best
    return summary


# -- services ---------------------------------------------------------------------------------

@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of our own: the bench never touches the shared one's databases."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _redis_ping(port), "redis-server")
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        stop(process)


def _redis_ping(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@contextmanager
def moto_s3(workdir: Path) -> Iterator[str]:
    """A moto S3 server in its own process, spoken to over HTTP."""
    port = free_port()
    with open(workdir / "moto.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), "moto server")
        yield url, process.pid
    finally:
        stop(process)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


def create_bucket(s3_url: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)


def stack_env(args: argparse.Namespace, database_url: str, redis_url: str, s3_url: str,
              workdir: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url, "BROKER_URL": redis_url, "S3_ENDPOINT_URL": s3_url, "S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "INSTABATCH_VAR_DIR": str(workdir / "var"), "INSTABATCH_MICRO_BATCH": str(args.micro_batch),
        "INSTABATCH_CHUNK_IMAGES": str(args.chunk), "INSTABATCH_PIPELINE_DEPTH": str(args.depth),
        "INSTABATCH_TORCH_THREADS": str(args.threads), "WORKER_METRICS_PORT": "0",
        "INSTABATCH_DEVICE_PROCESS": str(getattr(args, "device_process", 0)),  # bench.profile: in-process
        "INSTABATCH_ENCODE_POOL": getattr(args, "encode_pool", "thread"),
        "MAX_ITEMS_PER_BATCH": str(max(args.submit_items, args.items, 50_000)),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


# -- model only -------------------------------------------------------------------------------

def bench_model_only(args: argparse.Namespace) -> float:
    from core.params import GenerationParams
    from core.settings import get_settings
    from worker.model_runner import ModelRunner

    runner = ModelRunner(get_settings())
    params = GenerationParams()
    prompts = [PROMPT.format(colour=n % 12, n=n) for n in range(args.items)]
    runner.generate(prompts[:args.micro_batch], list(range(args.micro_batch)), params)  # warm-up
    began, cpu_began = time.perf_counter(), time.process_time()
    for first in range(0, len(prompts), args.micro_batch):
        batch = prompts[first:first + args.micro_batch]
        runner.generate(batch, list(range(first, first + len(batch))), params)
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    rate = len(prompts) / elapsed
    print(f"RESULT model_only_images={len(prompts)} model_only_s={elapsed:.2f} model_only_images_per_s={rate:.1f} "
          f"model_only_cpu_ms_per_image={1000 * cpu / len(prompts):.1f} model={runner.model_id} "
          f"micro_batch={args.micro_batch}", flush=True)
    return rate


# -- end to end -------------------------------------------------------------------------------

@dataclass
class RunResult:
    images: int
    seconds: float
    peak_rss_mb: float
    rss_mb: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def bench_end_to_end(url: str, key: str, env: dict[str, str], workdir: Path, items: int, *, naive: bool,
                     args: argparse.Namespace, others: dict[str, int]) -> RunResult:
    name = "naive" if naive else "end_to_end"
    worker_env = {**env, **({"INSTABATCH_MICRO_BATCH": "1", "INSTABATCH_PIPELINE_DEPTH": "0"} if naive else {})}
    with celery_worker(worker_env, workdir / f"worker-{name}.log") as worker:
        warm = submit(url, key, args.micro_batch, name=f"{name} warm-up")
        wait_done(env["DATABASE_URL"], warm, timeout=600)  # the worker has loaded its model
        sampler = RssSampler(worker.pid)
        processes = {"worker": worker.pid, **others}
        cpu_before = {label: cpu_seconds(pid) for label, pid in processes.items()}
        with sampler:
            began = time.perf_counter()
            batch_id = submit(url, key, items, name=name)
            counts = wait_done(env["DATABASE_URL"], batch_id, timeout=1800)
            elapsed = time.perf_counter() - began
        cpu = {label: cpu_seconds(pid) - cpu_before[label] for label, pid in processes.items()}
    result = RunResult(counts["succeeded"], elapsed, sampler.peak_mb, sampler.samples)
    trend = sampler.trend()
    print(f"RESULT {name}_images={result.images} {name}_s={elapsed:.2f} {name}_images_per_s={result.rate:.1f} "
          f"{name}_failed={items - counts['succeeded']} {name}_worker_peak_rss_mb={result.peak_rss_mb:.0f} "
          f"{name}_worker_rss_first_last_mb={trend}", flush=True)
    print(f"RESULT {name}_cpu_ms_per_image " + " ".join(
        f"{label}={1000 * seconds / max(result.images, 1):.1f}" for label, seconds in cpu.items()), flush=True)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (a worker's device process is its
    child: worker/device.py); PostgreSQL's, a shared server, are not counted."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/PID/task/TID/children."""
    found, pending = [], [pid]
    while pending:
        member = pending.pop()
        found.append(member)
        for children in Path(f"/proc/{member}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in children.read_text().split())
            except FileNotFoundError:
                continue
    return found


@contextmanager
def celery_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool",
                                    "solo", "-Q", WORKER_QUEUES, "--loglevel", "WARNING", "--without-heartbeat",
                                    "--without-mingle", "--without-gossip"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    try:
        yield process
    finally:
        stop(process, timeout=60)


def submit(url: str, key: str, items: int, *, name: str) -> str:
    body = {"name": name, "items": [{"prompt": PROMPT.format(colour=n % 12, n=n), "external_id": f"sku-{n}",
                                     "seed": n} for n in range(items)]}
    response = httpx.post(f"{url}/v1/batches", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    response.raise_for_status()
    return response.json()["id"]


def wait_done(database_url: str, batch_id: str, timeout: float) -> dict[str, int]:
    from core import ledger
    from core.db import make_engine, session_factory

    engine = make_engine(database_url)
    sessions = session_factory(engine)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with sessions() as session:
                counts = ledger.state_counts(session, [batch_id])[batch_id]
            if counts["queued"] + counts["running"] == 0:
                return counts
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise TimeoutError(f"batch {batch_id} not done after {timeout:g}s: {counts}")


class RssSampler:
    """The worker's resident memory every half second, and its peak (VmHWM)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = 0.0

    def _read(self, field_name: str) -> float:
        """The field summed over the worker and its device process (worker/device.py)."""
        total = 0.0
        for member in process_tree(self.pid):
            try:
                lines = Path(f"/proc/{member}/status").read_text().splitlines()
            except FileNotFoundError:
                continue
            total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith(field_name + ":"))
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(self._read("VmRSS"))

    def trend(self) -> str:
        if len(self.samples) < 4:
            return "-"
        quarter = max(len(self.samples) // 4, 1)
        return f"{statistics.mean(self.samples[:quarter]):.0f}/{statistics.mean(self.samples[-quarter:]):.0f}"

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max([self._read("VmHWM"), *self.samples])


# -- simulated device -------------------------------------------------------------------------

def bench_simulated(args: argparse.Namespace) -> dict[str, float]:
    """The chunk runner in this process with the simulation engine, per format, with the encoder jobs
    (watermark, encode, sign: worker/sealing.py) in threads and in spawned processes."""
    rates: dict[str, float] = {}
    device_rate = 1000 / args.device_ms
    for fmt, level, quality in SIM_FORMATS:
        label = f"{fmt}{level}" if fmt == "png" else f"{fmt}{quality}"
        for pool, suffix in (("thread", ""), ("process", "_processes")):
            rate, per_core = run_simulated(args, fmt, level, quality, pool=pool)
            rates[label + suffix] = rate
            name = f"sim512_{label}{suffix}"
            print(f"RESULT {name}_images_per_s={rate:.1f} {name}_images_per_cpu_s={per_core:.1f} "
                  f"{name}_cores_per_gpu={device_rate / per_core:.1f} device_ms={args.device_ms:g}", flush=True)
    return rates


def run_simulated(args: argparse.Namespace, fmt: str, level: int, quality: int, *, pool: str) -> tuple[float, float]:
    from sqlalchemy import select

    from bench.sim import SimulatedEngine
    from core import ledger
    from core.broker import make_celery
    from core.settings import get_settings
    from models import Outbox
    from worker.chunk import ChunkRunner
    from worker.context import WorkerContext

    settings = get_settings().model_copy(update={"png_compress_level": level, "encode_pool": pool,
                                                 "encode_workers": max(os.cpu_count() or 2, 2)})
    ctx = WorkerContext(settings, celery=make_celery(settings))
    ctx._model = SimulatedEngine(args.device_ms / 1000)  # type: ignore[assignment]
    params = {"width": 512, "height": 512, "output": {"format": fmt, "quality": quality}}
    with ctx.sessions() as session:
        specs = [ledger.ItemSpec(prompt=PROMPT.format(colour=n % 12, n=n), external_id=f"sim-{n}", seed=n)
                 for n in range(args.sim_items)]
        batch, _ = ledger.submit_batch(session, ledger.BatchSpec(f"sim {fmt}", specs, params), team="bench",
                                       actor="bench", chunk_images=settings.chunk_images)
        session.commit()
        chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch.id)
                                 .order_by(Outbox.id)).all()
    ChunkRunner(ctx, f"sim-warm-{fmt}-{pool}").run(chunks[0])  # pools, connections, caches
    encoders = list(getattr(ctx.encoders, "_processes", None) or {})  # a process pool's pids: their CPU counts
    began, images = time.perf_counter(), 0
    cpu_began = time.process_time() + sum(cpu_seconds(pid) for pid in encoders)
    for number, item_ids in enumerate(chunks[1:]):
        images += ChunkRunner(ctx, f"sim-{fmt}-{level}-{pool}-{number}").run(item_ids).images
    elapsed = time.perf_counter() - began
    cpu = time.process_time() + sum(cpu_seconds(pid) for pid in encoders) - cpu_began
    ctx.encoders.shutdown()
    return images / elapsed, images / cpu


# -- submission -------------------------------------------------------------------------------

def bench_submit(url: str, key: str, args: argparse.Namespace) -> float:
    seconds = []
    for run in range(args.submit_runs):
        began = time.perf_counter()
        submit(url, key, args.submit_items, name=f"submit 10k #{run}")
        seconds.append(time.perf_counter() - began)
    p50 = statistics.median(seconds)
    print(f"RESULT submit_10k_runs={len(seconds)} submit_10k_p50_s={p50:.3f} submit_10k_max_s={max(seconds):.3f} "
          f"submit_10k_items={args.submit_items}", flush=True)
    return p50


# -- helpers ----------------------------------------------------------------------------------

def wait_for(ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not start within {timeout:g}s")


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _clear_caches() -> None:
    from core import db, storage
    from core.settings import get_settings

    get_settings.cache_clear()
    db.engine_for.cache_clear()
    storage._store_for.cache_clear()


if __name__ == "__main__":
    sys.exit(main())
