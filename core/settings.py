"""Every knob of InstaBatch, read from the environment.

The defaults are the embedded ones: a SQLite ledger and a SQLite-backed Celery broker under
``./var``, images in ``./var/objects`` and the tiny InstaFlow model shipped in the repository,
so ``instabatch run`` works with no setup. Production points the same names at PostgreSQL,
Redis, S3 and a real checkpoint folder.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# The tiny model's folders, shipped in the repository: the embedded defaults.
WEIGHTS_DIR = REPO_ROOT / "instaflow" / "weights"
TINY_MODEL_DIR = WEIGHTS_DIR / "tiny-instaflow"
TINY_REFINER_DIR = WEIGHTS_DIR / "tiny-2rf"
TINY_JUDGE_DIR = WEIGHTS_DIR / "judge"
TINY_TEACHER_DIR = WEIGHTS_DIR / "tiny-teacher"  # the 1-RF teacher (instaflow/tiny/rederive.py)
TINY_DIRECT_DIR = WEIGHTS_DIR / "tiny-direct"  # the teacher distilled straight into one step (the ablation)
TINY_REGISTRY = WEIGHTS_DIR / "models.toml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    var_dir: Path = Field(Path("var"), alias="INSTABATCH_VAR_DIR")
    database_url: str = Field("", alias="DATABASE_URL")
    broker_url: str = Field("", alias="BROKER_URL")

    # Object storage: S3 when a bucket is named, else a local folder behind the same interface.
    s3_bucket: str = Field("", alias="S3_BUCKET")
    s3_endpoint_url: str | None = Field(None, alias="S3_ENDPOINT_URL")
    # The address browsers reach the store at, when it differs from the services' (compose: minio:9000).
    s3_public_endpoint_url: str | None = Field(None, alias="S3_PUBLIC_ENDPOINT_URL")
    s3_region: str = Field("us-east-1", alias="S3_REGION")
    s3_prefix: str = Field("instabatch", alias="S3_PREFIX")
    presign_seconds: int = Field(3600, alias="PRESIGN_SECONDS")
    objects_dir: Path | None = Field(None, alias="INSTABATCH_OBJECTS_DIR")

    # The generation engine. The registry names the models a batch may ask for (core/registry.py);
    # INSTABATCH_MODEL, when set, is the folder of the registry's default model.
    models_file: Path = Field(TINY_REGISTRY, alias="INSTABATCH_MODELS")
    model_path: Path = Field(TINY_MODEL_DIR, alias="INSTABATCH_MODEL")
    # How many registry models one worker process keeps loaded (least recently used dropped past it):
    # a count, not bytes: the registered models are one architecture loaded at one dtype, so each
    # costs the same device memory (docs/models.md, "Registry", has the measured parameter bytes).
    max_loaded_models: int = Field(2, alias="INSTABATCH_MAX_LOADED_MODELS", ge=1, le=64)
    refiner_path: Path = Field(TINY_REFINER_DIR, alias="INSTABATCH_REFINER")
    device: str | None = Field(None, alias="INSTABATCH_DEVICE")
    micro_batch: int = Field(16, alias="INSTABATCH_MICRO_BATCH", ge=1, le=1024)
    # CPU threads for torch in a worker (None: torch's default, one per core). On a CPU shared with
    # other busy processes, 1 can be many times faster than the default.
    torch_threads: int | None = Field(None, alias="INSTABATCH_TORCH_THREADS", ge=1)

    # Submission limits: bad input is a clear 4xx, never a half-written batch.
    max_items_per_batch: int = Field(50_000, alias="MAX_ITEMS_PER_BATCH")
    max_prompt_chars: int = Field(2_000, alias="MAX_PROMPT_CHARS")
    max_body_bytes: int = Field(20 * 1024 * 1024, alias="MAX_BODY_BYTES")
    max_images_per_item: int = Field(8, alias="MAX_IMAGES_PER_ITEM")
    min_side: int = Field(64, alias="MIN_IMAGE_SIDE")
    max_side: int = Field(1024, alias="MAX_IMAGE_SIDE")

    # Delivery: soft limit < hard limit < visibility timeout (docs/architecture.md, "Delivery").
    task_soft_time_limit: int = Field(240, alias="TASK_SOFT_TIME_LIMIT")
    task_time_limit: int = Field(300, alias="TASK_TIME_LIMIT")
    visibility_timeout: int = Field(360, alias="VISIBILITY_TIMEOUT")
    # Leases: a running chunk renews its items' lease every LEASE_HEARTBEAT_SECONDS (default a
    # quarter of the lease), so the lease can be short and a dead worker's items run again soon
    # ("Leases and heartbeats").
    lease_seconds: int = Field(60, alias="LEASE_SECONDS", ge=4)
    lease_heartbeat_seconds: float | None = Field(None, alias="LEASE_HEARTBEAT_SECONDS", gt=0)
    max_attempts: int = Field(3, alias="MAX_ATTEMPTS")
    # Dispatch ("Fair scheduling and broker loss"): at most DISPATCH_IN_FLIGHT chunks per queue
    # are in the broker unclaimed, chosen by priority then teams in turn; one unclaimed for
    # REDISPATCH_SECONDS while its queue stalled, or overtaken by a chunk sent after it, is sent again.
    dispatch_in_flight: int = Field(32, alias="DISPATCH_IN_FLIGHT", ge=1)
    redispatch_seconds: float = Field(30.0, alias="REDISPATCH_SECONDS", gt=0)
    # How long a worker retries a database or object store that does not answer before it gives
    # the chunk back ("Infrastructure faults are not item failures").
    infra_retry_seconds: float = Field(120.0, alias="INFRA_RETRY_SECONDS", ge=0)

    # Worker pipeline: how many images one task carries (the submitter cuts chunks of this size),
    # whether each forward pass is padded to `micro_batch` (an image's bytes then never depend on
    # its neighbours, even when a retry regenerates it alone), how often the sweeper runs, and
    # how long a completion webhook may take.
    # A chunk of several micro-batches lets the worker overlap them: the device renders
    # micro-batch k+1 while the CPU encodes, stores, checks and records k ("Overlapped stages").
    chunk_images: int = Field(64, alias="INSTABATCH_CHUNK_IMAGES", ge=1, le=4096)
    pad_micro_batch: bool = Field(True, alias="INSTABATCH_PAD_MICRO_BATCH")
    # Overlapped stages: micro-batches rendered but not yet recorded, at most (back-pressure: the
    # device waits rather than memory growing); threads or processes that encode images; PNG's
    # zlib level (1 is about twice as fast as 6 for a few per cent more bytes, docs/performance.md).
    pipeline_depth: int = Field(2, alias="INSTABATCH_PIPELINE_DEPTH", ge=0, le=64)  # 0: no overlap
    encode_workers: int = Field(2, alias="INSTABATCH_ENCODE_WORKERS", ge=1, le=256)
    encode_pool: Literal["thread", "process"] = Field("thread", alias="INSTABATCH_ENCODE_POOL")
    # The model in a process of its own, away from the GIL the worker's threads hold (worker/device.py);
    # for a solo-pool worker (a GPU worker). A prefork child cannot have one and runs the model itself.
    device_process: bool = Field(False, alias="INSTABATCH_DEVICE_PROCESS")
    png_compress_level: int = Field(6, alias="INSTABATCH_PNG_COMPRESS_LEVEL", ge=0, le=9)
    # Prometheus metrics of a worker process on this port (0: off). A prefork child serves on
    # port + its child index (docs/architecture.md, "Worker metrics").
    worker_metrics_port: int = Field(9100, alias="WORKER_METRICS_PORT", ge=0, le=65535)
    sweep_every_seconds: float = Field(15.0, alias="SWEEP_EVERY_SECONDS", gt=0)
    webhook_timeout_seconds: float = Field(5.0, alias="WEBHOOK_TIMEOUT_SECONDS", gt=0)
    # Webhooks go to addresses that submitters choose: by default never to loopback, private or
    # link-local addresses, so a batch cannot make the worker call services inside the network.
    webhook_allow_private: bool = Field(False, alias="WEBHOOK_ALLOW_PRIVATE")

    # Previews estimate device time from this rate: one-step images per second at the model's default
    # size on one device, as measured by `python -m bench.gpu` (RESULT images_per_s); the default is the
    # tiny model's on a CPU (docs/tiny-model.md). Guidance and refine steps scale it (api/catalogue.py).
    device_images_per_second: float = Field(60.0, alias="DEVICE_IMAGES_PER_SECOND", gt=0)

    # Webhooks (docs/webhooks.md): deliveries sent by a maintenance task every
    # WEBHOOK_DELIVER_EVERY_SECONDS; a failed one waits WEBHOOK_BACKOFF_SECONDS, doubled after
    # each failure up to WEBHOOK_BACKOFF_MAX_SECONDS, and ends `failed` after WEBHOOK_MAX_ATTEMPTS.
    # After a rotation the previous secret also signs for WEBHOOK_SECRET_GRACE_SECONDS.
    webhook_deliver_every_seconds: float = Field(5.0, alias="WEBHOOK_DELIVER_EVERY_SECONDS", gt=0)
    webhook_backoff_seconds: float = Field(10.0, alias="WEBHOOK_BACKOFF_SECONDS", gt=0)
    webhook_backoff_max_seconds: float = Field(3600.0, alias="WEBHOOK_BACKOFF_MAX_SECONDS", gt=0)
    webhook_max_attempts: int = Field(10, alias="WEBHOOK_MAX_ATTEMPTS", ge=1)
    webhook_secret_grace_seconds: float = Field(86_400.0, alias="WEBHOOK_SECRET_GRACE_SECONDS", ge=0)

    # Quotas per team (docs/quotas.md): defaults here, overridden per team by an admin. Images
    # queued or running at once, and submissions per minute (a moving window kept in
    # RATE_LIMIT_STORAGE_URL: the Redis broker by default, memory in the embedded setup).
    quota_max_queued_images: int = Field(200_000, alias="QUOTA_MAX_QUEUED_IMAGES", ge=0)
    quota_submissions_per_minute: int = Field(60, alias="QUOTA_SUBMISSIONS_PER_MINUTE", ge=0)
    quota_retry_after_seconds: int = Field(30, alias="QUOTA_RETRY_AFTER_SECONDS", ge=1)
    rate_limit_storage_url: str = Field("", alias="RATE_LIMIT_STORAGE_URL")

    # The API's /metrics reads the ledger's gauges (items by state, outbox chunks) at most this often.
    metrics_ledger_seconds: float = Field(15.0, alias="METRICS_LEDGER_SECONDS", ge=0)

    # Logs of the API and the worker: one JSON object a line ("json"), or "console" for people.
    log_format: str = Field("json", alias="LOG_FORMAT", pattern="^(json|console)$")
    log_level: str = Field("INFO", alias="LOG_LEVEL")

    # Audit anchoring of the hash chain in write-once object storage.
    anchor_every_seconds: int = Field(300, alias="AUDIT_ANCHOR_SECONDS")

    # Content Credentials (core/credentials.py, docs/compliance.md "Content Credentials"): every image
    # carries a C2PA manifest signed with this key and chain (a file path or the PEM itself). In
    # "dev" mode a deployment without them signs with an UNTRUSTED development chain that it makes
    # under var/credentials (what `make demo` does on a fresh machine); "required" refuses to start
    # a worker without them. C2PA_TEAM_KEYS_DIR/<team>/ may hold a team's own signing-key.pem and
    # signing-chain.pem. C2PA_TRUST_ANCHORS (PEM bundle) decides which signers verification trusts.
    credentials_mode: Literal["dev", "required"] = Field("dev", alias="INSTABATCH_CREDENTIALS")
    c2pa_signing_key: str | None = Field(None, alias="C2PA_SIGNING_KEY")
    c2pa_signing_chain: str | None = Field(None, alias="C2PA_SIGNING_CHAIN")
    c2pa_team_keys_dir: Path | None = Field(None, alias="C2PA_TEAM_KEYS_DIR")
    c2pa_trust_anchors: str | None = Field(None, alias="C2PA_TRUST_ANCHORS")
    c2pa_tsa_url: str | None = Field(None, alias="C2PA_TSA_URL")  # a timestamp authority; off by default
    # Teams whose prompts may appear in the manifest (comma-separated; prompts can be confidential).
    c2pa_prompt_teams: str = Field("", alias="C2PA_PROMPT_TEAMS")

    # Bootstrap admin key for a fresh deployment (hashed on first use, never stored in clear).
    bootstrap_admin_key: str | None = Field(None, alias="INSTABATCH_ADMIN_KEY")

    # Database concurrency, sized together from one number (core/db.py, api/deps.py): each process's
    # pool holds DB_POOL_SIZE connections (plus two for /readyz and /metrics), and the API admits
    # at most DB_POOL_SIZE requests to the database at once, with as many threads. A request that
    # waits DB_POOL_TIMEOUT seconds for its turn (or a connection) is answered 503 with Retry-After.
    db_pool_size: int = Field(10, alias="DB_POOL_SIZE", ge=1, le=500)
    db_pool_timeout: float = Field(10.0, alias="DB_POOL_TIMEOUT", gt=0, le=300)
    db_connect_timeout: int = Field(5, alias="DB_CONNECT_TIMEOUT", ge=1, le=300)
    # PostgreSQL ends a session left idle inside a transaction this long (0: never), and probes idle
    # connections: a host cut off mid-transaction would otherwise hold its row locks (the audit
    # chain head: every writer) until TCP gives up, hours later (docs/architecture.md, "Several hosts").
    db_idle_in_transaction_seconds: float = Field(120.0, alias="DB_IDLE_IN_TRANSACTION_SECONDS", ge=0)

    # API: the secret that signs local object URLs (a random one is kept in var_dir when unset,
    # shared by every API process on the machine).
    url_signing_secret: str | None = Field(None, alias="INSTABATCH_URL_SECRET")

    @model_validator(mode="after")
    def _embedded_defaults(self) -> "Settings":
        var = self.var_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'instabatch.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{var / 'broker.db'}"
        if self.objects_dir is None:
            self.objects_dir = var / "objects"
        if not self.rate_limit_storage_url:
            redis_broker = self.broker_url.startswith(("redis://", "rediss://"))
            self.rate_limit_storage_url = self.broker_url if redis_broker else "memory://"
        if not (self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout):
            raise ValueError(
                "need TASK_SOFT_TIME_LIMIT < TASK_TIME_LIMIT < VISIBILITY_TIMEOUT, "
                "or a running task is delivered twice"
            )
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ValueError("need LEASE_HEARTBEAT_SECONDS * 3 <= LEASE_SECONDS: a lease must survive "
                             "two missed heartbeats (a database blink) before it expires")
        return self

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_heartbeat_seconds or self.lease_seconds / 4

    def prompt_in_manifest(self, team: str | None) -> bool:
        return bool(team) and team in {name.strip() for name in self.c2pa_prompt_teams.split(",")}

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return settings
