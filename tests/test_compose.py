"""docker-compose.yml and .env.example, read as Compose reads them (YAML with anchors and merge keys,
``${NAME:-default}`` filled in): the services, their wiring, durability, health checks, the workers'
GPUs, that every command is a real CLI command and every variable a real setting. No Docker engine needed."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from dotenv import dotenv_values

from core.broker import MAINTENANCE_QUEUE, QUEUE_FOR_PRIORITY
from core.settings import REPO_ROOT, Settings
from qc.settings import QcSettings

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
# ${NAME}, ${NAME:-default}, ${NAME-default}; $$ is a literal dollar for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")
# Read by the images or libraries the services run, not by core/settings.py.
IMAGE_VARIABLES = {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH"}
LIBRARY_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # boto3's
# Settings that land from other branches: the lead drops a name from here once core/settings.py has it.
PENDING_SETTINGS: set[str] = set()  # settings compose names before they land in core/settings.py


def interpolate(text: str, values: dict[str, str]) -> str:
    """What Compose does with ${...}: the value from .env (``values``), else the default."""
    def fill(match: re.Match) -> str:
        name, _, default = match.groups()
        return values.get(name) or (default or "")
    return VARIABLE.sub(fill, text)


def load_compose(values: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), values))


def setting_names() -> set[str]:
    """Every environment variable the product reads as a setting (core/settings.py, qc/settings.py)."""
    names = {field.alias or name.upper() for name, field in Settings.model_fields.items()}
    return names | {f"QC_{name.upper()}" for name in QcSettings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose({})  # a fresh checkout: no .env, every default


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def app_services(services: dict) -> list[str]:
    return [name for name, service in services.items() if str(service.get("image", "")).startswith("instabatch:")]


def workers(services: dict) -> list[str]:
    return [name for name in services if name.startswith("worker")]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_the_stack_has_every_part(services):
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "api", "beat", "flower"} <= set(services)
    assert len(workers(services)) >= 2
    one_shot = {"minio-init", "migrate"}
    assert all("healthcheck" in service for name, service in services.items() if name not in one_shot)
    assert (REPO_ROOT / "Dockerfile").is_file()


def test_a_cpu_image_for_the_api_and_a_cuda_image_for_the_workers(services):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert {"torch-cpu", "torch-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    assert "FROM torch-${TORCH_FLAVOUR}" in dockerfile
    for name in app_services(services):
        flavour = "cuda" if name in workers(services) else "cpu"
        assert services[name]["image"] == f"instabatch:{flavour}", name
        assert services[name]["build"]["args"]["TORCH_FLAVOUR"] == flavour, name


def test_redis_is_a_durable_broker(services):
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])


@pytest.mark.parametrize("values", ["defaults", ".env.example"])
def test_the_apps_are_wired_to_postgres_redis_and_the_bucket_that_is_created(values):
    services = load_compose({} if values == "defaults" else dotenv_values(ENV_EXAMPLE))["services"]
    postgres_env = env_of(services["postgres"])
    minio_env = env_of(services["minio"])
    bucket = env_of(services["minio-init"])["S3_BUCKET"]
    assert "mc mb" in services["minio-init"]["command"][0]
    for name in app_services(services):
        env = env_of(services[name])
        database = urlsplit(env["DATABASE_URL"])
        assert (database.hostname, database.username, database.password, database.path.lstrip("/")) == (
            "postgres", postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"])
        assert urlsplit(env["BROKER_URL"]).scheme == "redis" and urlsplit(env["BROKER_URL"]).hostname == "redis"
        assert urlsplit(env["S3_ENDPOINT_URL"]).hostname == "minio" and env["S3_BUCKET"] == bucket
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
        # The same environment must make valid settings (time limits in the right order, ...).
        settings = Settings(_env_file=None, **{key: value for key, value in env.items()})
        assert settings.task_soft_time_limit < settings.task_time_limit < settings.visibility_timeout
        assert settings.heartbeat_seconds * 3 <= settings.lease_seconds
    flower_broker = next(arg for arg in services["flower"]["command"] if arg.startswith("--broker="))
    assert flower_broker == "--broker=" + env_of(services["api"])["BROKER_URL"]


def test_apps_start_after_the_database_is_migrated_and_the_bucket_exists(services):
    for name in app_services(services):
        if name == "migrate":
            continue
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["instabatch", "db", "upgrade"]


def test_one_worker_per_gpu_each_a_solo_process_on_its_own_device(services):
    device_ids, metrics_ports = [], []
    for name in workers(services):
        worker = services[name]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" not in devices[0] and len(devices[0]["device_ids"]) == 1, name  # exactly one GPU each
        device_ids += devices[0]["device_ids"]
        command = worker["command"]
        assert command[:2] == ["instabatch", "worker"] and command[command.index("--pool") + 1] == "solo"
        env = env_of(worker)
        assert env["INSTABATCH_DEVICE"] == "cuda"
        metrics_ports += [port.split(":")[0] for port in worker["ports"] if port.endswith(":" + env["WORKER_METRICS_PORT"])]
        # A warm shutdown lets the running chunk finish: allow at least the hard time limit.
        assert seconds(worker["stop_grace_period"]) >= int(env["TASK_TIME_LIMIT"])
        assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    assert len(set(device_ids)) == len(device_ids), f"two workers share a GPU: {device_ids}"
    assert len(set(metrics_ports)) == len(workers(services)), f"each worker's metrics on a port of its own: {metrics_ports}"


def test_beat_api_and_flower_run_their_commands(services):
    assert services["beat"]["command"][:2] == ["instabatch", "beat"]
    assert services["api"]["command"][:2] == ["instabatch", "serve"]
    assert "8000:8000" in services["api"]["ports"]
    assert services["flower"]["command"][0] == "celery" and "flower" in services["flower"]["command"]
    assert env_of(services["flower"])["FLOWER_BASIC_AUTH"]  # never an open Flower


def test_every_instabatch_command_of_a_service_is_a_real_cli_command(services):
    """Each ``instabatch ...`` command line parses against the Typer app: subcommands and options exist."""
    cli = typer.main.get_command(__import__("cli.main", fromlist=["app"]).app)
    checked = 0
    for name, service in services.items():
        command = service.get("command")
        if not (isinstance(command, list) and command[:1] == ["instabatch"]):
            continue
        group, args, path = cli, list(command[1:]), ["instabatch"]
        while hasattr(group, "list_commands"):  # a group (typer's click, not necessarily `click`'s classes)
            sub = args.pop(0)
            group = group.get_command(group.context_class(group), sub)
            assert group is not None, f"{name}: no command `{' '.join(path + [sub])}`"
            path.append(sub)
        group.make_context(" ".join(path), args)  # a usage error on an unknown option or value
        checked += 1
    assert checked >= 5  # migrate, api, workers, beat


def test_every_variable_in_compose_and_env_example_is_a_real_setting(services):
    settings = setting_names()
    example = dotenv_values(ENV_EXAMPLE)
    used_in_compose = {match.group(1) for match in VARIABLE.finditer(COMPOSE_FILE.read_text())}
    known = settings | IMAGE_VARIABLES | LIBRARY_VARIABLES | PENDING_SETTINGS
    for name in app_services(services):
        unknown = set(env_of(services[name])) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of core/settings.py"
    assert not (used_in_compose - settings - IMAGE_VARIABLES), "a ${NAME} in docker-compose.yml that nothing reads"
    unused = set(example) - used_in_compose
    assert not unused, f".env.example sets {sorted(unused)}, which docker-compose.yml never uses"
    everywhere = set(re.findall(r"\bINSTABATCH_[A-Z0-9_]+", COMPOSE_FILE.read_text() + ENV_EXAMPLE.read_text()))
    assert everywhere <= settings, f"not settings: {sorted(everywhere - settings)}"
    assert not (PENDING_SETTINGS & settings), f"{PENDING_SETTINGS & settings} landed: drop it from PENDING_SETTINGS"


def test_the_worker_consumes_every_queue_the_api_publishes_to():
    from worker.app import WORKER_QUEUES

    assert set(QUEUE_FOR_PRIORITY.values()) | {MAINTENANCE_QUEUE} == set(WORKER_QUEUES)


def test_the_image_installs_the_pinned_torch_before_the_project():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.index("torch==") < dockerfile.index("pip install -e .")
    pinned = re.search(r'torch==([\d.]+)"', (REPO_ROOT / "pyproject.toml").read_text()) or re.search(
        r"torch==([\d.]+)", (REPO_ROOT / "pyproject.toml").read_text())
    assert f"TORCH_VERSION={pinned.group(1)}" in dockerfile
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ignored.count(".venv") == 1 and ".env" in ignored  # no secrets baked into an image
