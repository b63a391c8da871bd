"""One scenario's InstaBatch stack, every part a separate process on loopback.

    private PostgreSQL (session-wide cluster, a fresh database per scenario)
    private Redis (per scenario, no persistence)
    moto S3 (session-wide, a fresh bucket per scenario) behind a TcpProxy (per scenario)
    API:     python -m uvicorn api.main:app
    beat:    python -m celery -A worker.celery_app beat
    workers: python -m celery -A worker.celery_app worker --pool solo|prefork ...  (cli.supervisor's command)

Every child gets the same environment: the product's settings come from it, and the harness sets
only where the parts are (DATABASE_URL, BROKER_URL, S3_*, AWS_* dummy credentials,
INSTABATCH_VAR_DIR), one torch thread and a bootstrap admin key. Delivery timings (lease, sweep,
visibility timeout) stay the product's defaults; the wait bounds are derived from them.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from cli.supervisor import worker_command
from core.settings import REPO_ROOT, Settings
from tests.fixtures.services import free_port
from tests.faults.services import MotoServer, PrivatePostgres, PrivateRedis, Proc, TcpProxy, wait_until
from worker.app import WORKER_QUEUES

TEAM = "faults"
# Set by the harness for every child; inherited values of these are dropped.
HARNESS_VARS = (
    "DATABASE_URL", "BROKER_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "S3_PUBLIC_ENDPOINT_URL", "S3_REGION", "S3_PREFIX",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "INSTABATCH_VAR_DIR", "INSTABATCH_OBJECTS_DIR", "INSTABATCH_ADMIN_KEY", "INSTABATCH_TORCH_THREADS",
    "INSTABATCH_MODEL", "INSTABATCH_REFINER", "INSTABATCH_DEVICE", "PYTHONPATH", "DIE_BEFORE_CLAIM",
)
S3_PREFIX = "instabatch"  # the product's default, spelled out because the invariant checker lists under it
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "dead", "cancelled")


def base_env(var_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in HARNESS_VARS}
    env.update({
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "INSTABATCH_VAR_DIR": str(var_dir),
        "INSTABATCH_TORCH_THREADS": "1",
        "AWS_ACCESS_KEY_ID": "faults", "AWS_SECRET_ACCESS_KEY": "faults", "AWS_DEFAULT_REGION": "us-east-1",
    })
    return env


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def product_settings(env: dict[str, str]) -> Settings:
    """The settings the stack's processes run with (they read the same environment)."""
    with environment(env):
        return Settings(_env_file=None)


@dataclass(frozen=True)
class Bounds:
    """Waits derived from the product's settings, never tuned to today's numbers.

    ``stall_s``: the longest a healthy recovery may leave a batch without any change: a lease
    expires, the next sweep requeues, the relay publishes, a worker runs the chunk.
    ``hard_s``: the generous bound past which a non-terminal item is *stuck*:
    3 x (lease + sweep interval) + the batch's own time.
    """

    lease_s: float
    sweep_s: float
    visibility_s: float
    stall_s: float
    hard_s: float

    @classmethod
    def of(cls, settings: Settings, images: int) -> "Bounds":
        lease, sweep = float(settings.lease_seconds), float(settings.sweep_every_seconds)
        batch_time = 60.0 + 0.5 * images  # 2 shared cores, tiny model: well under 0.5 s an image end to end
        stall = float(os.environ.get("INSTABATCH_FAULTS_STALL_S", 0)) or lease + 2 * sweep + 60.0
        hard = float(os.environ.get("INSTABATCH_FAULTS_HARD_S", 0)) or 3 * (lease + sweep) + batch_time
        return cls(lease, sweep, float(settings.visibility_timeout), stall, hard)


class Infra:
    """What lives for the whole session: the PostgreSQL cluster and the moto server."""

    def __init__(self, root: Path, listen: Sequence[str] = ("127.0.0.1",), clients: Sequence[str] = ()):
        self.root = root
        self.pg = PrivatePostgres(listen, clients)
        self.moto = MotoServer(root, base_env(root / "var"))

    def close(self) -> None:
        self.moto.close()
        self.pg.close()


class FaultStack:
    """A scenario's stack: its own database, Redis, bucket, proxy, API, beat and workers."""

    def __init__(self, infra: Infra, root: Path, name: str, *, listen: Sequence[str] = ("127.0.0.1",),
                 settings_env: dict[str, str] | None = None):
        """``listen``: where the private Redis listens (tests/netns.py adds the links' host sides);
        ``settings_env``: product settings every process of the stack runs with (shorter leases...)."""
        import boto3

        self.infra = infra
        self.root = root
        self.name = name
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = base_env(root / "var")
        self.env.update(settings_env or {})
        self.redis = PrivateRedis(root, self.env, listen)
        self.bucket = f"faults-{name.replace('_', '-')[:30]}-{uuid.uuid4().hex[:6]}"
        self.s3 = boto3.client("s3", endpoint_url=infra.moto.url, region_name="us-east-1",
                               aws_access_key_id="faults", aws_secret_access_key="faults")
        self.s3.create_bucket(Bucket=self.bucket)
        self.s3_proxy = TcpProxy(infra.moto.port, name="s3-proxy")
        self.database = f"faults_{name[:40]}_{uuid.uuid4().hex[:6]}".lower()
        self.database_url = infra.pg.new_database(self.database)
        self.admin_key = "ib-admin-" + secrets.token_urlsafe(24)
        self.env.update({
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.redis.url,
            "S3_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.s3_proxy.url,  # workers and API reach S3 through the proxy only
            "S3_PREFIX": S3_PREFIX,
            "INSTABATCH_ADMIN_KEY": self.admin_key,
        })
        self.settings = product_settings(self.env)
        self.engine = create_engine(self.database_url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                                    connect_args={"connect_timeout": 5})
        self.api_port = free_port()
        self.api: Proc | None = None
        self.api_starts = 0
        self.beat: Proc | None = None
        self.workers: list[Proc] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30.0)
        self.keys: dict[str, str] = {}

    # -- processes -----------------------------------------------------------------------

    def start_api(self, wait: bool = True) -> Proc:
        self.api_starts += 1
        command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                   "--port", str(self.api_port), "--log-level", "warning"]
        self.api = Proc(f"api-{self.api_starts}", command, self.env, self.logs / "api.log", cwd=REPO_ROOT)
        if wait:
            self.wait_api()
        return self.api

    def wait_api(self, timeout: float = 90.0) -> None:
        def healthy() -> bool:
            if self.api is not None and not self.api.alive:
                raise RuntimeError(f"the API exited: {self.api.tail()}")
            return self.client.get("/healthz", timeout=2).status_code == 200
        wait_until(healthy, timeout, what="API /healthz")

    def start_beat(self) -> Proc:
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel", "INFO"]
        self.beat = Proc("beat", command, self.env, self.logs / "beat.log", cwd=REPO_ROOT)
        return self.beat

    def start_worker(self, pool: str = "solo", concurrency: int = 1, app: str = "worker.celery_app",
                     wait: bool = True, *, wrap: Sequence[str] = (), env: dict[str, str] | None = None) -> Proc:
        """A worker as ``instabatch worker`` / docker-compose run it (cli.supervisor's command line).
        ``wrap``/``env``: a command prefix and environment of its own (tests/netns.py: another host)."""
        index = len(self.workers) + 1
        name = f"{pool}{index}"
        command = worker_command(pool=pool, concurrency=concurrency, loglevel="INFO", queues=WORKER_QUEUES,
                                 name=f"{name}-{os.getpid()}@%h", app=app)
        proc = Proc(f"worker-{name}", [*wrap, *command], env or self.env, self.logs / f"worker-{name}.log",
                    cwd=REPO_ROOT)
        proc.pool = pool  # type: ignore[attr-defined]
        self.workers.append(proc)
        if wait:
            self.wait_worker(proc)
        return proc

    def wait_worker(self, proc: Proc, timeout: float = 180.0) -> None:
        """Until Celery says ``ready`` (and, for prefork, the children exist)."""
        def ready() -> bool:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
            if " ready." not in proc.log_text():
                return False
            return getattr(proc, "pool", "solo") != "prefork" or bool(proc.children())
        wait_until(ready, timeout, interval=0.5, what=f"{proc.name} ready")

    def live_workers(self) -> list[Proc]:
        return [proc for proc in self.workers if proc.alive]

    def worker_pids(self) -> list[int]:
        """Every live worker process: solo workers, prefork parents and their pool children."""
        return [pid for proc in self.live_workers() for pid in (proc.pid, *proc.children())]

    def close(self) -> None:
        for proc in [*self.workers, self.beat, self.api]:
            if proc is not None:
                proc.kill()
        self.client.close()
        self.s3_proxy.close()
        self.redis.close()
        self.engine.dispose()
        try:  # the database stays small; drop it so a long session does not pile them up
            admin = create_engine(self.infra.pg.url(), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            admin.dispose()
        except Exception:  # noqa: BLE001 - the cluster may be down after a failed scenario
            pass

    # -- the API, as a client ------------------------------------------------------------

    def create_keys(self) -> dict[str, str]:
        """Submitter, reviewer and auditor keys, created through the API with the bootstrap admin key."""
        for role in ("submitter", "reviewer", "auditor"):
            response = self.client.post("/v1/keys", json={"name": f"faults {role}", "role": role, "team": TEAM},
                                        headers={"Authorization": f"Bearer {self.admin_key}"})
            assert response.status_code == 201, response.text
            self.keys[role] = response.json()["key"]
        return self.keys

    def auth(self, role: str = "submitter") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = self.auth()
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        response = self.client.post("/v1/batches", json=body, headers=headers)
        assert response.status_code in (200, 202), response.text
        return response.json()

    def api_batch(self, batch_id: str) -> dict[str, Any] | None:
        try:
            response = self.client.get(f"/v1/batches/{batch_id}", headers=self.auth("auditor"), timeout=10)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    # -- the ledger, read directly --------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def snapshot(self, batch_id: str) -> dict[str, int]:
        """Item counts per state, attempts and image rows: what "the batch moved" is measured on."""
        counts = {state: 0 for state in (*ACTIVE, *TERMINAL)}
        with self.engine.connect() as conn:
            for state, n, attempts in conn.execute(text(
                    "SELECT state, count(*), coalesce(sum(attempts), 0) FROM items WHERE batch_id = :b GROUP BY state"),
                    {"b": batch_id}):
                counts[state] = int(n)
                counts["attempts"] = counts.get("attempts", 0) + int(attempts)
            counts["images"] = int(conn.execute(text("SELECT count(*) FROM images WHERE batch_id = :b"),
                                                {"b": batch_id}).scalar())
            finished = conn.execute(text("SELECT finished_at IS NOT NULL FROM batches WHERE id = :b"),
                                    {"b": batch_id}).scalar()
        counts.setdefault("attempts", 0)
        counts["finished"] = int(bool(finished))
        return counts

    def running_owners(self, batch_id: str) -> dict[str, list[str]]:
        """Lease owners (``host:pid:task``) of the batch's running items."""
        owners: dict[str, list[str]] = {}
        for item_id, owner in self.query("SELECT id, lease_owner FROM items WHERE batch_id = :b AND state = 'running'",
                                         b=batch_id):
            owners.setdefault(owner or "", []).append(item_id)
        return owners

    @staticmethod
    def owner_pid(owner: str) -> int | None:
        host = socket.gethostname()
        if not owner.startswith(f"{host}:"):
            return None
        pid = owner[len(host) + 1:].split(":", 1)[0]
        return int(pid) if pid.isdigit() else None

    # -- the broker ----------------------------------------------------------------------

    def broker_depths(self) -> dict[str, int | str]:
        try:
            client = self.redis.client()
            depths: dict[str, int | str] = {queue: client.llen(queue) for queue in WORKER_QUEUES}
            depths["unacked"] = client.hlen("unacked")
            return depths
        except Exception as error:  # noqa: BLE001
            return {"error": type(error).__name__}

    # -- diagnosis -----------------------------------------------------------------------

    def worker_deaths(self) -> int:
        """Prefork children lost (os._exit, SIGKILL) as the workers' logs tell it."""
        pattern = re.compile(r"pid:\d+ exited with '")  # "Process 'ForkPoolWorker-1' pid:123 exited with 'exitcode 13'"
        return sum(len(pattern.findall(proc.log_text())) for proc in self.workers)

    def diagnose(self, batch_id: str) -> str:
        """Why items are not terminal: per (state, attempts, lease, outbox) group, the broker, the workers."""
        try:
            items = self.query("SELECT id, state, attempts, lease_expires_at, lease_owner, error FROM items "
                               "WHERE batch_id = :b AND state IN ('queued', 'running')", b=batch_id)
            outbox = self.query("SELECT id, item_ids, dispatched_at FROM outbox WHERE batch_id = :b ORDER BY id",
                                b=batch_id)
            now = self.query("SELECT now()")[0][0]
        except Exception as error:  # noqa: BLE001
            return f"ledger unreachable: {type(error).__name__}: {error}"
        latest: dict[str, Any] = {}
        for _, item_ids, dispatched in outbox:
            for item_id in (item_ids if isinstance(item_ids, list) else json.loads(item_ids)):
                latest[item_id] = dispatched
        groups: dict[str, int] = {}
        for item_id, state, attempts, expires, owner, _ in items:
            if expires is None:
                lease = "no lease"
            elif expires < now:
                lease = f"lease expired {int((now - expires).total_seconds())}s ago"
            else:
                lease = f"lease valid {int((expires - now).total_seconds())}s more"
            if item_id not in latest:
                chunk = "in no outbox chunk"
            elif latest[item_id] is None:
                chunk = "outbox chunk pending"
            else:
                chunk = "outbox chunk dispatched"
            key = f"{state} attempts={attempts} {lease} {chunk}"
            groups[key] = groups.get(key, 0) + 1
        pending = sum(1 for _, _, dispatched in outbox if dispatched is None)
        depths = self.broker_depths()
        parts = []
        lost_messages = [item_id for item_id, state, _, expires, _, _ in items
                         if state == "queued" and expires is None and latest.get(item_id) is not None]
        if lost_messages and all(v == 0 for v in depths.values()):
            parts.append(f"CONCLUSION: {len(lost_messages)} queued items whose chunks were dispatched while the "
                         "broker holds no message (queues and unacked empty): their messages were lost and "
                         "nothing publishes them again")
        parts += [f"{n} {key}" for key, n in sorted(groups.items(), key=lambda kv: -kv[1])]
        parts.append(f"outbox rows {len(outbox)} ({pending} pending)")
        parts.append("broker " + " ".join(f"{k}={v}" for k, v in depths.items()))
        parts.append("workers alive " + ",".join(f"{p.name}={'yes' if p.alive else 'no'}" for p in self.workers))
        if self.beat is not None:
            parts.append(f"beat alive={'yes' if self.beat.alive else 'no'}")
        return "; ".join(parts)

    def log_excerpt(self, lines: int = 6) -> str:
        out = []
        for proc in [*self.workers, self.beat, self.api]:
            if proc is None:
                continue
            interesting = [line for line in proc.log_text().splitlines()
                           if re.search(r"ERROR|CRITICAL|Traceback|Error:|WARNING", line)]
            if interesting:
                out.append(f"--- {proc.name} ({proc.log_path}):\n" + "\n".join(interesting[-lines:]))
        return "\n".join(out)


def batch_body(name: str, n_items: int, *, prompts: Sequence[str] | None = None, num_images_every: int = 5) -> dict:
    """``n_items`` prompts; every ``num_images_every``-th item asks for two images."""
    items = []
    for i in range(n_items):
        prompt = prompts[i] if prompts and i < len(prompts) else f"a ceramic mug, product photo, colour {i % 12}, variant {i}"
        items.append({"prompt": prompt, "external_id": f"sku-{i:04d}", "seed": 1000 + i,
                      "num_images": 2 if num_images_every and i % num_images_every == num_images_every - 1 else 1})
    return {"name": name, "items": items}


def images_of(body: dict) -> int:
    return sum(item.get("num_images", 1) for item in body["items"])


def now() -> float:
    return time.monotonic()
