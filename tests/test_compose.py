"""docker-compose.yml, read as Compose reads it (YAML with anchors and merge keys): the services, their
wiring, durability, health checks and the worker's GPU. No Docker engine needed."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from core.broker import MAINTENANCE_QUEUE, QUEUE_FOR_PRIORITY
from core.settings import REPO_ROOT, Settings

APP_SERVICES = ("api", "worker", "beat")
LONG_RUNNING = ("redis", "postgres", "minio", "api", "worker", "beat")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_the_stack_has_every_part(services):
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "api", "worker", "beat"} <= set(services)
    assert all("healthcheck" in services[name] for name in LONG_RUNNING)
    assert services["api"]["build"] == "." and (REPO_ROOT / "Dockerfile").is_file()


def test_redis_is_a_durable_broker(services):
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])


def test_the_apps_are_wired_to_postgres_redis_and_the_bucket_that_is_created(services):
    postgres_env = env_of(services["postgres"])
    minio_env = env_of(services["minio"])
    bucket = env_of(services["minio-init"])["S3_BUCKET"]
    assert "mc mb" in services["minio-init"]["command"][0]
    for name in APP_SERVICES + ("migrate",):
        env = env_of(services[name])
        database = urlsplit(env["DATABASE_URL"])
        assert (database.hostname, database.username, database.password, database.path.lstrip("/")) == (
            "postgres", postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"])
        assert urlsplit(env["BROKER_URL"]).scheme == "redis" and urlsplit(env["BROKER_URL"]).hostname == "redis"
        assert urlsplit(env["S3_ENDPOINT_URL"]).hostname == "minio" and env["S3_BUCKET"] == bucket
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
        # The same environment must make valid settings (time limits in the right order, ...).
        settings = Settings(**{key: value for key, value in env.items()})
        assert settings.task_soft_time_limit < settings.task_time_limit < settings.visibility_timeout
        assert settings.heartbeat_seconds * 3 <= settings.lease_seconds


def test_apps_start_after_the_database_is_migrated_and_the_bucket_exists(services):
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["instabatch", "db", "upgrade"]


def test_the_worker_reserves_a_gpu_and_runs_one_solo_process_on_it(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = worker["command"]
    assert command[:2] == ["instabatch", "worker"] and command[command.index("--pool") + 1] == "solo"
    assert env_of(worker)["INSTABATCH_DEVICE"] == "cuda"
    # A warm shutdown lets the running chunk finish: allow at least the hard time limit.
    assert seconds(worker["stop_grace_period"]) >= int(env_of(worker)["TASK_TIME_LIMIT"])


def test_beat_and_api_run_their_commands(services):
    assert services["beat"]["command"][:2] == ["instabatch", "beat"]
    assert services["api"]["command"][:2] == ["instabatch", "serve"]
    assert "8000:8000" in services["api"]["ports"]


def test_the_worker_consumes_every_queue_the_api_publishes_to():
    from worker.app import WORKER_QUEUES

    assert set(QUEUE_FOR_PRIORITY.values()) | {MAINTENANCE_QUEUE} == set(WORKER_QUEUES)


def test_the_image_installs_the_pinned_torch_before_the_project():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.index("torch==") < dockerfile.index("pip install -e .")
    pinned = re.search(r'torch==([\d.]+)"', (REPO_ROOT / "pyproject.toml").read_text()) or re.search(
        r"torch==([\d.]+)", (REPO_ROOT / "pyproject.toml").read_text())
    assert f"TORCH_VERSION={pinned.group(1)}" in dockerfile
    assert Path(REPO_ROOT / ".dockerignore").read_text().count(".venv") == 1
