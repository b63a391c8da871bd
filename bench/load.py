"""API load: N concurrent clients submitting and polling batches, ``python -m bench.load``.

Each client loops: submit a small batch (``--items`` prompts), then poll ``GET /v1/batches/{id}``
``--polls`` times, until ``--duration`` seconds have passed (or ``--max-iterations``). Every
level (``--clients 1,10,50,200``) prints one line::

    RESULT clients=50 submits_per_s=... polls_per_s=... errors=... p50_ms=... p99_ms=... ...

Without ``--url`` it starts its own API (``python -m cli.main serve``) on a fresh PostgreSQL
database and its own Redis db number (no worker: batches stay queued), creates a submitter key,
samples the API's PostgreSQL connections while the clients run, and drops the database at the
end. With ``--url`` it targets a running API with ``--key`` (a submitter key) or ``--admin-key``
(creates one). Loopback only in the self-started mode; every loop is bounded in count and time.
It prints figures and never passes or fails on time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("LOAD_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("LOAD_REDIS_URL", "redis://127.0.0.1:6379")
DRAIN_S = 60.0  # after the deadline, requests still in flight get this long to finish (then they are errors)


# -- one level of load ------------------------------------------------------------------------

@dataclass
class LevelResult:
    clients: int
    elapsed_s: float
    submits: int = 0
    polls: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    submit_ms: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    unreadable: int = 0  # a batch whose 202 came back but whose GET did not find it

    @property
    def latencies_ms(self) -> list[float]:
        return self.submit_ms + self.poll_ms

    def percentile(self, q: float, latencies: list[float] | None = None) -> float:
        latencies = self.latencies_ms if latencies is None else latencies
        if not latencies:
            return float("nan")
        ordered = sorted(latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def line(self, **extra: object) -> str:
        fields = {
            "clients": self.clients,
            "submits_per_s": f"{self.submits / self.elapsed_s:.1f}",
            "polls_per_s": f"{self.polls / self.elapsed_s:.1f}",
            "errors": self.errors,
            "p50_ms": f"{self.percentile(50):.1f}",
            "p99_ms": f"{self.percentile(99):.1f}",
            "submit_p99_ms": f"{self.percentile(99, self.submit_ms):.1f}",
            "poll_p99_ms": f"{self.percentile(99, self.poll_ms):.1f}",
            "submitted": self.submits,
            "seconds": f"{self.elapsed_s:.1f}",
            **extra,
        }
        if self.error_kinds:
            fields["error_kinds"] = ",".join(f"{kind}:{n}" for kind, n in self.error_kinds.most_common())
        return "RESULT " + " ".join(f"{name}={value}" for name, value in fields.items())


def batch_body(client: int, n: int, items: int) -> dict:
    return {"name": f"load c{client} #{n}", "items": [
        {"prompt": f"a ceramic mug on a white table, product photo, variant {i}", "external_id": f"sku-{i}",
         "seed": i} for i in range(items)]}


async def _client_loop(http: httpx.AsyncClient, client: int, deadline: float, result: LevelResult, *,
                       items: int, polls: int, max_iterations: int) -> None:
    def failed(kind: str) -> None:
        result.errors += 1
        result.error_kinds[kind] += 1

    for n in range(max_iterations):
        if time.monotonic() >= deadline:
            return
        began = time.perf_counter()
        try:
            response = await http.post("/v1/batches", json=batch_body(client, n, items))
        except httpx.HTTPError as exc:
            failed(type(exc).__name__)
            continue
        result.submit_ms.append((time.perf_counter() - began) * 1000)
        if response.status_code != 202:
            failed(f"submit_{response.status_code}")
            await asyncio.sleep(0.05)  # a failing server is not hammered in a tight loop
            continue
        result.submits += 1
        batch_id = response.json()["id"]
        result.batch_ids.append(batch_id)
        for _ in range(polls):
            began = time.perf_counter()
            try:
                response = await http.get(f"/v1/batches/{batch_id}")
            except httpx.HTTPError as exc:
                failed(type(exc).__name__)
                continue
            result.poll_ms.append((time.perf_counter() - began) * 1000)
            if response.status_code == 200 and response.json().get("id") == batch_id:
                result.polls += 1
            else:
                failed(f"poll_{response.status_code}")
                if response.status_code == 404:
                    result.unreadable += 1


async def _one_client(url: str, key: str, client: int, deadline: float, result: LevelResult, *, items: int,
                      polls: int, timeout: float, max_iterations: int) -> None:
    # One connection per client, kept alive between its requests, like a real client process; a
    # pool shared by all clients would leave some connections idle past the server's keep-alive.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=timeout) as http:
        await _client_loop(http, client, deadline, result, items=items, polls=polls, max_iterations=max_iterations)


async def _run_level(url: str, key: str, clients: int, duration: float, *, items: int, polls: int,
                     timeout: float, max_iterations: int) -> LevelResult:
    result = LevelResult(clients=clients, elapsed_s=0.0)
    began = time.monotonic()
    deadline = began + duration
    tasks = [asyncio.create_task(_one_client(url, key, c, deadline, result, items=items, polls=polls,
                                             timeout=timeout, max_iterations=max_iterations))
             for c in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=duration + DRAIN_S)
    for task in pending:  # bounded: a hung request past the drain is an error, not a hang
        task.cancel()
        result.errors += 1
        result.error_kinds["unfinished"] += 1
    for task in done:
        if task.exception() is not None:
            result.errors += 1
            result.error_kinds[type(task.exception()).__name__] += 1
    result.elapsed_s = time.monotonic() - began
    return result


def run_level(url: str, key: str, clients: int, duration: float, *, items: int = 4, polls: int = 2,
              timeout: float = 30.0, max_iterations: int = 100_000) -> LevelResult:
    """One level: ``clients`` loops of submit + ``polls`` polls for ``duration`` seconds."""
    return asyncio.run(_run_level(url, key, clients, duration, items=items, polls=polls, timeout=timeout,
                                  max_iterations=max_iterations))


# -- a self-started API on PostgreSQL + Redis ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode} before answering")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout:g}s")


@contextmanager
def api_server(database_url: str, broker_url: str, workdir: Path, extra_env: dict[str, str] | None = None
               ) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``instabatch serve`` on loopback in a process of its own; yields (url, process, log file)."""
    port = free_port()
    log_path = workdir / f"api-{port}.log"
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": broker_url,
           "INSTABATCH_VAR_DIR": str(workdir / "var"),
           # The load runs measure what the API serves, not the per-team quotas (0 = no limit), which
           # would answer most of 50 clients' submissions with 429 (tests/test_quotas.py covers those).
           "QUOTA_SUBMISSIONS_PER_MINUTE": "0", "QUOTA_MAX_QUEUED_IMAGES": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           **(extra_env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=str(workdir))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url, process, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def fresh_database(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A new, migrated PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from core.migrate import upgrade

    name = f"instabatch_load_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def create_submitter_key(database_url: str, team: str = "load") -> str:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from core import keys
    from core.db import normalize_url
    from models import Role

    engine = create_engine(normalize_url(database_url))
    try:
        with Session(engine) as session:
            _key, plaintext = keys.create_key(session, "load bench", Role.SUBMITTER, team, actor="bench.load")
            session.commit()
    finally:
        engine.dispose()
    return plaintext


def create_key_via_api(url: str, admin_key: str, team: str = "load") -> str:
    response = httpx.post(f"{url}/v1/keys", json={"name": "load bench", "role": "submitter", "team": team},
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    response.raise_for_status()
    return response.json()["key"]


class ConnectionSampler:
    """Samples the API database's connections (pg_stat_activity) while a level runs."""

    def __init__(self, admin_url: str, database: str, every_s: float = 0.5):
        from sqlalchemy import create_engine

        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
        self.database = database
        self.every_s = every_s
        self.max_total = 0
        self.max_idle_in_transaction = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ConnectionSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.engine.dispose()

    def _run(self) -> None:
        from sqlalchemy import text

        query = text("SELECT state, count(*) FROM pg_stat_activity WHERE datname = :db "
                     "AND backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY state")
        while not self._stop.wait(self.every_s):
            try:
                with self.engine.connect() as conn:
                    states = dict(conn.execute(query, {"db": self.database}).all())
            except Exception:  # noqa: BLE001 - a missed sample is not worth failing the bench for
                continue
            self.max_total = max(self.max_total, sum(states.values()))
            self.max_idle_in_transaction = max(self.max_idle_in_transaction, states.get("idle in transaction", 0))


SERVER_COUNTERS = {"nested_checkouts": "instabatch_db_nested_checkouts_total",
                   "permit_timeouts": "instabatch_db_permit_timeouts_total"}


def server_counters(url: str) -> dict[str, str]:
    """The API's own counters of the level (``n/a`` where this API version has none)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values = {}
    for name, metric in SERVER_COUNTERS.items():
        lines = [line for line in text.splitlines() if line.startswith(metric + " ")]
        values[name] = str(int(float(lines[0].split()[1]))) if lines else "n/a"
    return values


def log_counts(log_path: Path, offset: int) -> tuple[dict[str, int], int]:
    """Tell-tale lines the API logged since ``offset``: pool time-outs, tracebacks."""
    data = log_path.read_bytes()
    new = data[offset:].decode("utf-8", "replace")
    return {"pool_timeouts_logged": new.count("QueuePool limit"),
            "tracebacks_logged": new.count("Traceback (most recent call last)")}, len(data)


# -- the command ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running API (default: start one on PostgreSQL + Redis)")
    parser.add_argument("--key", help="a submitter key for --url")
    parser.add_argument("--admin-key", help="an admin key for --url: creates a submitter key")
    parser.add_argument("--clients", default="1,10,50,200", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    parser.add_argument("--items", type=int, default=4, help="prompts per submitted batch")
    parser.add_argument("--polls", type=int, default=2, help="GET /v1/batches/{id} per submission")
    parser.add_argument("--timeout", type=float, default=30.0, help="client time-out per request (s)")
    parser.add_argument("--max-iterations", type=int, default=100_000, help="submissions per client at most")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between levels")
    parser.add_argument("--redis-db", type=int, default=15, help="Redis db number, flushed at the end (default 15: "
                        "the test fixtures take 1-14)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the self-started API (repeatable)")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.clients.split(",") if level.strip()]
    if any(level < 1 for level in args.levels) or args.duration <= 0 or args.duration > 600:
        parser.error("levels must be >= 1 and --duration in (0, 600]")
    if args.url and not (args.key or args.admin_key):
        parser.error("--url needs --key or --admin-key")
    return args


def run_levels(args: argparse.Namespace, url: str, key: str, sampler_factory=None,
               log_path: Path | None = None) -> list[LevelResult]:
    results = []
    offset = log_path.stat().st_size if log_path else 0
    for i, clients in enumerate(args.levels):
        if i:
            time.sleep(args.pause)
        extra: dict[str, object] = {}
        if sampler_factory is not None:
            with sampler_factory() as sampler:
                result = run_level(url, key, clients, args.duration, items=args.items, polls=args.polls,
                                   timeout=args.timeout, max_iterations=args.max_iterations)
            extra.update(max_db_conns=sampler.max_total, max_idle_in_tx=sampler.max_idle_in_transaction)
        else:
            result = run_level(url, key, clients, args.duration, items=args.items, polls=args.polls,
                               timeout=args.timeout, max_iterations=args.max_iterations)
        if log_path is not None:
            counts, offset = log_counts(log_path, offset)
            extra.update(counts)
            extra.update(server_counters(url))  # cumulative over the levels run so far
        if result.unreadable:
            extra["unreadable"] = result.unreadable
        print(result.line(**extra), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"levels={args.levels} duration={args.duration:g}s items={args.items} polls={args.polls} "
          f"timeout={args.timeout:g}s", flush=True)
    if args.url:
        key = args.key or create_key_via_api(args.url, args.admin_key)
        run_levels(args, args.url.rstrip("/"), key)
        return 0

    import redis

    broker_url = f"{REDIS_BASE_URL}/{args.redis_db}"
    extra_env = dict(item.split("=", 1) for item in args.env)
    workdir = Path(tempfile.mkdtemp(prefix="instabatch-load-"))
    try:
        with fresh_database() as database_url:
            key = create_submitter_key(database_url)
            database = database_url.rsplit("/", 1)[1]
            with api_server(database_url, broker_url, workdir, extra_env) as (url, _process, log_path):
                print(f"api={url} database={database} broker={broker_url} log={log_path}", flush=True)
                run_levels(args, url, key, lambda: ConnectionSampler(PG_ADMIN_URL, database), log_path)
    finally:
        redis.Redis.from_url(broker_url).flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
