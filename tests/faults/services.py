"""The parts the fault suite may break, each private to the suite: PostgreSQL, Redis, moto S3, a TCP proxy.

Every process is started in its own process group and registered, so a finalizer (or, at the
latest, interpreter exit) kills the whole group even when a scenario fails half-way. Nothing here
touches the shared PostgreSQL (5432) or Redis (6379): every service listens on a free loopback
port of its own.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.fixtures.services import free_port, wait_for_port

PG_BIN = Path(os.environ.get("INSTABATCH_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

_live: set["Proc"] = set()
_live_lock = threading.Lock()


def missing_prerequisites() -> str | None:
    """Why the suite cannot run here (None when it can): it needs initdb, runuser and redis-server."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN} (set INSTABATCH_FAULTS_PG_BIN)"
    if not Path(REDIS_SERVER).exists():
        return "no redis-server on PATH"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser (PostgreSQL refuses to run as root)"
    return None


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str], log_path: Path,
                 cwd: str | Path | None = None):
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start {name}: {' '.join(self.command)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        """Direct children (a prefork pool's processes), from /proc."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group: no cleanup, no warm shutdown (what the OOM killer does)."""
        self.signal_group(signal.SIGKILL)
        self._reap(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Celery's warm shutdown, uvicorn's graceful one), then SIGKILL for the group."""
        if self.alive:
            self.signal_group(signal.SIGTERM)
            self._reap(timeout)
        self.signal_group(signal.SIGKILL)  # stragglers of the group (prefork children)
        self._reap(10)

    def _reap(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if not self.alive:
            with _live_lock:
                _live.discard(self)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def kill_everything() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        proc.kill()


atexit.register(kill_everything)


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - a service coming up refuses connections for a while
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout:.0f}s" + (f" (last error: {last_error})" if last_error else ""))


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: run its tools as the postgres user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PrivatePostgres:
    """A PostgreSQL cluster of the suite's own, which scenarios may stop and start.

    One cluster per session; each scenario gets a fresh database copied from a migrated template
    (``CREATE DATABASE ... TEMPLATE``: much faster than running the migrations again).
    """

    TEMPLATE = "instabatch_template"

    def __init__(self, listen: Sequence[str] = ("127.0.0.1",), clients: Sequence[str] = ()) -> None:
        """``listen``: loopback, plus the host side of each link for tests/netns.py's hosts;
        ``clients``: networks (CIDR) allowed in besides loopback, the links' other ends."""
        self.listen = tuple(listen)
        self.dir = Path(tempfile.mkdtemp(prefix="instabatch-faults-pg-"))
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])
        if clients:
            hba = self.data / "pg_hba.conf"
            hba.write_text(hba.read_text() + "".join(f"host all all {network} trust\n" for network in clients))
        self.start()
        self._template_ready = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, command: list[str], timeout: float = 90) -> None:
        result = subprocess.run(_as_postgres(command), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def _pg_ctl(self, *args: str, timeout: float = 90) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], timeout=timeout)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses={','.join(self.listen)} "
                   "-c max_connections=200 -c fsync=off")
        self._pg_ctl("-o", options, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        result = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]),
                                capture_output=True, timeout=30)
        return result.returncode == 0

    def new_database(self, name: str) -> str:
        """A fresh, migrated database (from the template, migrated once per session)."""
        from sqlalchemy import create_engine, text

        from core.migrate import upgrade

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                if not self._template_ready:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self.TEMPLATE}"'))
                    conn.execute(text(f'CREATE DATABASE "{self.TEMPLATE}"'))
            if not self._template_ready:
                upgrade(self.url(self.TEMPLATE))
                from core import db as core_db
                core_db.engine_for.cache_clear()
                self._template_ready = True
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.TEMPLATE}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        except Exception:  # noqa: BLE001 - fall back to the postmaster's pid
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A Redis of the suite's own, without persistence: a restart loses every message."""

    def __init__(self, root: Path, env: dict[str, str], listen: Sequence[str] = ("127.0.0.1",)):
        self.root = root
        self.env = env
        self.listen = tuple(listen)
        self.port = free_port()
        self.proc: Proc | None = None
        self.restarts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", *self.listen, "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--dir", str(self.root), "--protected-mode", "no"]
        self.proc = Proc("redis", command, self.env, self.root / "redis.log")
        wait_for_port(self.port, timeout=30)

    def restart(self, down_seconds: float = 0.5) -> None:
        """Kill it (SIGKILL: a crash) and start an empty one on the same port."""
        assert self.proc is not None
        self.proc.kill()
        time.sleep(down_seconds)
        self.restarts += 1
        self.start()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5, socket_connect_timeout=5)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()


class MotoServer:
    """moto's S3 over HTTP. In memory: a restarted moto would have lost the bucket and every object,
    which is why S3 outages go through :class:`TcpProxy` instead of stopping this server."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.port = free_port()
        self.proc = Proc("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                         env, root / "moto.log")
        wait_for_port(self.port, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.kill()


class TcpProxy:
    """A loopback TCP proxy in front of a server; ``down()`` refuses new connections and cuts the
    open ones (the server looks stopped), ``up()`` listens again on the same port."""

    def __init__(self, target_port: int, name: str = "proxy", host: str = "127.0.0.1"):
        self.target = ("127.0.0.1", target_port)
        self.name = name
        self.host = host  # the address it listens on (the host side of a link in tests/netns.py)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self.connections = 0
        self.refused_while_down = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                listener.bind((self.host, self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        listener.listen(128)
        listener.settimeout(0.5)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"{self.name}-accept", daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = list(self._sockets), set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            _close(sock)

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def close(self) -> None:
        self._closed = True
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed and self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(upstream)
                    return
                self._sockets.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name=f"{self.name}-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _close(sock)
                with self._lock:
                    self._sockets.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
