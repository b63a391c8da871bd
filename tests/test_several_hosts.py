"""Several hosts for real: two workers on hosts of their own (issue 12).

Each worker runs in a network namespace with its own hostname (tests/netns.py) and reaches the
private PostgreSQL, Redis and S3 (moto, through a proxy on its link) only over its veth link;
the API and beat run on this machine. Three scenarios, each checked with the fault suite's
invariants (tests/faults/invariants.py: object count == images, sha256 match, one recorded run
per item):

- one batch split across both hosts; one host's link goes down mid-batch (a pulled cable: its
  worker keeps running, holding leases it can no longer renew) and the batch finishes on the
  other host once those leases expire; then the link comes back and the returning worker's late
  writes are refused;
- one host's clock runs 90 s behind (libfaketime): it keeps every lease it takes;
- one host is cut off while a session of it holds the audit chain head (every writer's lock):
  the server ends that session, and the other host goes on.

Delivery timings are shortened (a 20 s lease, a 5 s sweep) so the takeover is quick; the bound
the batch must meet is derived from them (tests/faults/stack.py, ``Bounds``).
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import REPO_ROOT
from tests import netns
from tests.faults import invariants
from tests.faults import services as fault_services
from tests.faults.runner import Scenario, say
from tests.faults.services import Proc, TcpProxy, kill_everything, wait_until
from tests.faults.stack import FaultStack, Infra, batch_body

HOSTS = ("host-a", "host-b")
ITEMS = 60
SETTINGS = {
    "LEASE_SECONDS": "20", "SWEEP_EVERY_SECONDS": "5", "REDISPATCH_SECONDS": "10",
    "INSTABATCH_CHUNK_IMAGES": "4", "DISPATCH_IN_FLIGHT": "4", "DB_IDLE_IN_TRANSACTION_SECONDS": "10",
}

# What a worker logs as a chunk ends (worker/app.py, worker/chunk.py), whichever way it ends.
STALE_CHUNK_ENDS = ("chunk done", "lease lost", "given back", "raised unexpected")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _why_not_here() -> str | None:
    return fault_services.missing_prerequisites() or netns.missing_prerequisites()


class Hosts:
    """The links, the stack on this machine and, per host, the worker's environment."""

    def __init__(self, root: Path):
        self.links = [netns.Link(i, subnet, HOSTS[i]) for i, subnet in enumerate(netns.free_subnets(len(HOSTS)))]
        listen = ("127.0.0.1", *(link.host_ip for link in self.links))
        self.infra = Infra(root, listen, clients=[f"{link.peer_ip}/32" for link in self.links])
        self.stack = FaultStack(self.infra, root / "stack", "several_hosts", listen=listen, settings_env=SETTINGS)
        self.s3_proxies = [TcpProxy(self.infra.moto.port, name=f"s3-{link.hostname}", host=link.host_ip)
                           for link in self.links]
        self.workers = {}

    def env_for(self, index: int) -> dict[str, str]:
        """The stack's environment with every service addressed over this host's link."""
        link = self.links[index]
        env = dict(self.stack.env)
        for name in ("DATABASE_URL", "BROKER_URL"):
            env[name] = env[name].replace("127.0.0.1", link.host_ip)
        env["S3_ENDPOINT_URL"] = self.s3_proxies[index].url
        return env

    def start_workers(self, env_by_host: dict[str, dict[str, str]] | None = None) -> None:
        for index, link in enumerate(self.links):
            env = {**self.env_for(index), **(env_by_host or {}).get(link.hostname, {})}
            self.workers[link.hostname] = self.stack.start_worker("solo", wrap=link.wrap(), env=env)

    def close(self) -> None:
        self.stack.close()
        for proxy in self.s3_proxies:
            proxy.close()
        self.infra.close()
        for link in self.links:
            link.close()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why = _why_not_here()
    if why:
        pytest.skip(f"several hosts cannot be made here: {why}")
    root = Path(tempfile.mkdtemp(prefix="instabatch-hosts-"))
    made = None
    try:
        made = Hosts(root)
        made.stack.start_beat()
        made.stack.start_api()
        made.stack.create_keys()
        yield made
    finally:
        if made is not None:
            made.close()
        kill_everything()
        netns.close_all()
        shutil.rmtree(root, ignore_errors=True)


def generated_by_host(stack: FaultStack, batch_id: str) -> Counter:
    """Recorded runs (``item.generated`` events) per worker hostname."""
    rows = stack.query("SELECT payload FROM audit_events WHERE batch_id = :b AND action = 'item.generated'", b=batch_id)
    return Counter(_payload(row[0])["worker"].split(":", 1)[0] for row in rows)


def running_on(stack: FaultStack, batch_id: str, hostname: str) -> list[str]:
    return [item_id for owner, item_ids in stack.running_owners(batch_id).items()
            if owner.startswith(f"{hostname}:") for item_id in item_ids]


def _payload(value):
    import json

    return value if isinstance(value, dict) else json.loads(value)


def wait_both_busy(sc: Scenario, victim: str, survivor: str) -> tuple[dict, list[str]]:
    """Until both hosts recorded runs and the victim holds running items: (runs per host, its items)."""
    def both_hosts_busy():
        snap = sc.sample()
        if snap is not None and snap["finished"]:
            raise AssertionError("the batch ended before the link could be cut; raise ITEMS")
        done = generated_by_host(sc.stack, sc.batch_id)
        held = running_on(sc.stack, sc.batch_id, victim)
        return (done[victim] >= 1 and done[survivor] >= 1 and held) and (dict(done), held)

    return wait_until(both_hosts_busy, 300, interval=0.1, what="both hosts generating, the victim mid-chunk")


def test_a_batch_split_across_two_hosts_finishes_after_one_is_cut_off(hosts: Hosts) -> None:
    stack = hosts.stack
    hosts.start_workers()
    victim, survivor = HOSTS
    sc = Scenario(stack, "several_hosts_cut_link", batch_body("several hosts", ITEMS))
    sc.submit()

    done_before, held = wait_both_busy(sc, victim, survivor)
    hosts.links[0].cut()
    sc.mark_fault(f"link of {victim} cut (done so far {done_before})", held)
    result = sc.finish()

    done = generated_by_host(stack, sc.batch_id)
    say(f"runs per host {dict(done)}")
    assert set(done) == set(HOSTS), f"both hosts must have recorded runs: {dict(done)}"
    assert sum(done.values()) == ITEMS, f"one recorded run per item: {dict(done)}"
    held_owners = stack.query("SELECT payload FROM audit_events WHERE action = 'item.generated' AND item_id = ANY(:ids)",
                              ids=held)
    assert {_payload(row[0])["worker"].split(":", 1)[0] for row in held_owners} == {survivor}, (
        "the chunk in flight on the cut-off host finished on the other one")
    assert hosts.workers[victim].alive, "the cut-off worker still runs: a partition, not a crash"
    lease_bound = float(SETTINGS["LEASE_SECONDS"]) + 2 * float(SETTINGS["SWEEP_EVERY_SECONDS"])
    # The partition heals: the cut-off worker wakes up holding a chunk the other host finished. Its
    # late writes must be refused by the lease (worker/leases.py), never recorded a second time.
    victim_log = hosts.workers[victim]
    seen = len(victim_log.log_text())
    hosts.links[0].up()
    healed_at = time.monotonic()
    wait_until(lambda: any(sign in victim_log.log_text()[seen:] for sign in STALE_CHUNK_ENDS), 300,
               what=f"{victim} ending its stale chunk after the link came back")
    rejoined_s = time.monotonic() - healed_at
    say(f"{victim} after the link came back:\n" + "\n".join(
        line for line in victim_log.log_text()[seen:].splitlines() if any(sign in line for sign in STALE_CHUNK_ENDS)))
    again = invariants.check(stack, [sc.batch_id])
    assert again.ok, f"after the partition healed: {again.problems()}"
    assert generated_by_host(stack, sc.batch_id) == done, "the cut-off host recorded a run after it came back"
    # takeover_s: the cut -> every item the cut-off host held is terminal (done by the other host).
    print(f"RESULT several_hosts items={ITEMS} runs_{victim}={done[victim]} runs_{survivor}={done[survivor]} "
          f"held_at_cut={len(held)} takeover_s={result.inflight_s:.1f} lease_bound_s={lease_bound:.0f} "
          f"total_s={result.total_s:.1f} rejoined_s={rejoined_s:.1f} orphans_after_rejoin={len(again.orphans)}", flush=True)


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW_S = 90  # behind by more than a lease: every lease it writes looks expired to the sweeper


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs libfaketime (Debian package faketime) to skew a clock")
def test_a_host_whose_clock_is_behind_neither_loses_its_work_nor_kills_items(hosts: Hosts) -> None:
    """Lease times come from the ledger's clock, so a host with a wrong clock holds its leases as long as any."""
    stack = hosts.stack
    skewed, other = HOSTS
    hosts.start_workers({skewed: {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"-{SKEW_S}s",
                                  "FAKETIME_DONT_FAKE_MONOTONIC": "1"}})
    sc = Scenario(stack, "several_hosts_clock_skew", batch_body("skewed clock", ITEMS))
    sc.submit()
    result = sc.finish()
    done = generated_by_host(stack, sc.batch_id)
    swept = stack.query("SELECT count(*) FROM audit_events WHERE action = 'items.swept'")[0][0]
    lost = victim_lines = len(re.findall(r"lease lost on", hosts.workers[skewed].log_text()))
    say(f"runs per host {dict(done)}, sweeps that requeued {swept}, lease-lost lines on {skewed}: {victim_lines}")
    assert result.extra["states"] == f"succeeded:{ITEMS}"
    assert done[skewed] >= 1 and done[other] >= 1, f"both hosts must have recorded runs: {dict(done)}"
    assert swept == 0 and lost == 0, f"{skewed}'s leases were taken from it while it ran: {swept} sweeps, {lost} lost"
    print(f"RESULT several_hosts_clock_skew items={ITEMS} skew_s=-{SKEW_S} runs_{skewed}={done[skewed]} "
          f"runs_{other}={done[other]} requeue_sweeps={swept} leases_lost={lost} total_s={result.total_s:.1f}", flush=True)


# What a worker does in the middle of recording a result: the chain head is every writer's lock.
HOLD_CHAIN_HEAD = """
import time
from sqlalchemy import text
from core.db import get_engine
with get_engine().connect() as conn:
    conn.execute(text("UPDATE audit_chain_head SET last_seq = last_seq"))
    print("holding the audit chain head", flush=True)
    time.sleep(3600)
"""


def test_a_host_cut_off_in_the_middle_of_a_transaction_does_not_stall_the_others(hosts: Hosts) -> None:
    """Its locks go with its session once the session sits idle in the transaction for
    DB_IDLE_IN_TRANSACTION_SECONDS; before, they stayed until TCP gave up (hours)."""
    stack = hosts.stack
    victim, survivor = HOSTS
    hosts.start_workers()
    sc = Scenario(stack, "several_hosts_cut_in_transaction", batch_body("cut mid-transaction", ITEMS))
    sc.submit()
    wait_both_busy(sc, victim, survivor)
    holder = Proc("chain-head-holder", [*hosts.links[0].wrap(), sys.executable, "-c", HOLD_CHAIN_HEAD],
                  hosts.env_for(0), stack.logs / "holder.log", cwd=REPO_ROOT)
    # a line of its own: the log's header line holds the command, message included
    wait_until(lambda: "holding the audit chain head" in holder.log_text().splitlines(), 120,
               what="the chain head held")
    hosts.links[0].cut()
    sc.mark_fault(f"link of {victim} cut while a session of it holds the audit chain head")
    result = sc.finish()
    freed = stack.query("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                        "AND client_addr = :addr", addr=hosts.links[0].peer_ip)[0][0]
    assert freed == 0, f"{victim} still holds {freed} sessions idle in a transaction"
    assert result.extra["states"] == f"succeeded:{ITEMS}"
    print(f"RESULT several_hosts_cut_in_transaction items={ITEMS} "
          f"idle_in_transaction_s={SETTINGS['DB_IDLE_IN_TRANSACTION_SECONDS']} recovery_s={result.recovery_s:.1f} "
          f"total_s={result.total_s:.1f}", flush=True)
