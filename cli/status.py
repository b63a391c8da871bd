"""``instabatch status``: a live Rich view of queues, workers, throughput and the newest batches.

The data comes from core/status.py (broker, Celery remote control, ledger); this module only
draws it: one frame with ``--once`` (scripts, tests), else redrawn every ``--interval`` seconds
until Ctrl-C.
"""
from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from core.status import Snapshot
from models import ItemState

STATES = tuple(state.value for state in ItemState)
WIDTH_WHEN_PIPED = 120  # a file or a pipe has no width: wide enough for every column, unwrapped


def render(snap: Snapshot) -> Group:
    parts = [_overview(snap), _batches(snap)]
    if snap.problems:
        parts.append(Panel("\n".join(snap.problems), title="not answering", border_style="red"))
    return Group(*parts)


def _overview(snap: Snapshot) -> Table:
    queues = Table(title="queues", title_justify="left")
    queues.add_column("queue")
    queues.add_column("depth", justify="right")
    for name, depth in snap.queues.items():
        queues.add_row(name, str(depth))
    workers = Table(title=f"workers ({len(snap.workers)})", title_justify="left")
    workers.add_column("worker")
    workers.add_column("active", justify="right")
    for worker in snap.workers:
        workers.add_row(worker.name, str(worker.active_tasks))
    if not snap.workers:
        workers.add_row("[yellow]none answered[/]", "")
    grid = Table.grid(padding=(0, 4))
    grid.add_row(queues, workers, f"[bold]{snap.images_per_second:.2f}[/] images/s\n(last minute)")
    return grid


def _batches(snap: Snapshot) -> Table:
    table = Table(title="newest batches", title_justify="left")
    for column in ("batch", "name", "team", "priority", "progress", "items done", "items by state"):
        table.add_column(column, no_wrap=True)
    for line in snap.batches:
        states = ", ".join(f"{line.counts[state]} {state}" for state in STATES if line.counts.get(state))
        table.add_row(line.id[:8], line.name[:24], line.team[:16], line.priority,
                      ProgressBar(total=max(line.total_items, 1), completed=line.done, width=20),
                      f"{line.done}/{line.total_items}" + (" finished" if line.finished else ""), states or "-")
    return table


def take_snapshot(batches: int) -> Snapshot:
    from core.broker import get_celery
    from core.db import session_scope
    from core.status import snapshot
    from worker.app import WORKER_QUEUES

    with session_scope() as session:
        return snapshot(session, get_celery(), WORKER_QUEUES, batches=batches)


def status(
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between frames", min=0.2)] = 2.0,
    batches: Annotated[int, typer.Option(help="how many of the newest batches to show", min=1, max=100)] = 8,
) -> None:
    """Queues, workers (Celery inspect), images/s over the last minute and the newest batches, live."""
    from cli.main import _migrate_embedded  # here: cli.main imports this module

    _migrate_embedded()
    console = Console() if sys.stdout.isatty() else Console(width=WIDTH_WHEN_PIPED)
    if once:
        console.print(render(take_snapshot(batches)))
        return
    with Live(render(take_snapshot(batches)), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(take_snapshot(batches)))
        except KeyboardInterrupt:
            pass
