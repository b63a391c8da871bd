"""``instabatch run FILE --out DIR``: submit a prompt file, run a worker, show progress, write the results.

The batch goes through the same ledger, outbox, broker and worker as an API submission. Running
the same command again resumes the same batch (its Idempotency-Key is the file's content and the
options): nothing already generated is generated again, failed items get another try, and the
results are written again from the stored images. ``--fresh`` submits a new batch instead.

``--template T.json`` reads FILE as a catalogue (api/catalogue.py); the team ``cli``'s brand rules
apply as they do to API batches. ``--dry-run`` prints the preview (count, first prompts, device
time, every row's problem) and queues nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cli.export import export_batch
from cli.inputs import InputError, api_error_text, read_request
from cli.supervisor import DEFAULT_APP, WorkerProcess
from core import ledger
from core.broker import make_celery
from core.db import make_engine, session_factory
from core.dispatch import dispatch_pending
from core.migrate import upgrade
from core.settings import Settings, get_settings
from core.storage import make_store
from models import Image, ItemState
from worker.completion import complete_if_done
from worker.sweeper import sweep

CLI_TEAM = "cli"
SWEEP_EVERY = 5.0  # seconds between sweeps in the watch loop: expired leases, pending chunks
EXIT_OK, EXIT_ITEMS_FAILED, EXIT_INPUT, EXIT_TROUBLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class RunTrouble(RuntimeError):
    """The run could not finish: the worker keeps dying, or the time limit passed."""


@dataclass
class RunOptions:
    file: Path
    out: Path
    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False
    start_worker: bool = True
    timeout: float | None = None
    poll_seconds: float = 0.5
    worker_app: str = DEFAULT_APP
    template: Path | None = None
    dry_run: bool = False


def plan_file(options: RunOptions) -> tuple[sessionmaker[Session], Any]:
    """The migrated ledger's sessions and the file's plan under the team ``cli``'s brand rules."""
    from api.catalogue import plan_request
    from api.errors import APIError

    settings = get_settings()
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    request = read_request(options.file, name=options.name or options.file.stem, params=options.params,
                           template=options.template)
    with sessions() as session:
        try:
            return sessions, plan_request(session, CLI_TEAM, request)
        except APIError as error:
            raise InputError(f"{options.file}: {api_error_text(error)}") from None


def checked_spec(plan: Any) -> ledger.BatchSpec:
    from api.catalogue import checked_spec as check
    from api.errors import APIError

    try:
        return check(plan)
    except APIError as error:
        raise InputError(api_error_text(error)) from None


def preview(options: RunOptions, console: Console) -> int:
    """Print what the file would submit; nothing is queued. Exit 0 when it would be accepted, else 2."""
    from api.catalogue import preview as preview_plan

    _, plan = plan_file(options)
    result = preview_plan(plan)
    print_preview(console, result)
    return EXIT_OK if result.ok else EXIT_INPUT


def print_preview(console: Console, result: Any) -> None:
    rows = f" from {result.rows} rows x {result.variants_per_row} variants" if result.rows is not None else ""
    console.print(f"{result.items} items{rows}, {result.images} images, about "
                  f"{result.estimated_device_seconds:.1f} s of device time at {result.device_images_per_second:g} "
                  f"images/s; brand rules version {result.brand_rules_version or '-'}", highlight=False)
    for item in result.prompts:
        seed = item.seed if item.seed is not None else "random"
        console.print(escape(f"  {item.external_id or '-'}  seed {seed}  {item.prompt}"), highlight=False,
                      soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for problem in result.problems:
        where = f"line {problem.line}" if problem.line is not None else f"row {problem.row}"
        column = f", column {problem.column!r}" if problem.column else ""
        rule = f" (rule {problem.rule})" if problem.rule else ""
        console.print(f"[red]problem:[/] {escape(f'{where}{column}{rule}: {problem.message}')}", highlight=False,
                      soft_wrap=True)
    console.print(f"RESULT preview_items={result.items} preview_problems={len(result.problems)} "
                  f"preview_device_seconds={result.estimated_device_seconds}", highlight=False, soft_wrap=True)


def run(options: RunOptions, console: Console, actor: str) -> int:
    if options.dry_run:
        return preview(options, console)
    settings = get_settings()
    sessions, plan = plan_file(options)
    spec = checked_spec(plan)
    celery = make_celery(settings)
    batch_id, note = submit(sessions, spec, settings, actor=actor, fresh=options.fresh,
                            brand_rules_version=plan.branded.version)
    console.print(f"batch [bold]{batch_id}[/] ({note}): {len(spec.items)} items, "
                  f"{sum(i.num_images for i in spec.items)} images")
    dispatch_pending(sessions, celery)

    images_before = images_of(sessions, batch_id)
    started = time.monotonic()
    worker = WorkerProcess(settings.var_dir.resolve() / "logs" / "run-worker.log", app=options.worker_app)
    try:
        if options.start_worker and active_items(sessions, batch_id):
            worker.start()
        watch(sessions, celery, settings, batch_id, worker if options.start_worker else None, options, console)
    finally:
        worker.stop()
    complete_if_done(sessions, batch_id, actor=actor, settings=settings)
    elapsed = time.monotonic() - started

    summary = export_batch(sessions, make_store(settings), batch_id, options.out)
    counts = counts_of(sessions, batch_id)
    generated = images_of(sessions, batch_id) - images_before
    print_summary(console, counts, summary.images, generated, elapsed, summary.results_csv)
    return EXIT_OK if counts[ItemState.SUCCEEDED.value] == sum(counts.values()) else EXIT_ITEMS_FAILED


def submit(sessions: sessionmaker[Session], spec: ledger.BatchSpec, settings: Settings, *, actor: str,
           fresh: bool, brand_rules_version: int | None = None) -> tuple[str, str]:
    """Submit, or resume the batch this same file and options made before; retry its failures."""
    key = None if fresh else f"instabatch-run:{spec.fingerprint()}"
    with sessions() as session:
        batch, created = ledger.submit_batch(session, spec, team=CLI_TEAM, actor=actor, idempotency_key=key,
                                             chunk_images=settings.chunk_images,
                                             brand_rules_version=brand_rules_version)
        note = "new"
        if not created:
            retried = ledger.retry_batch(session, batch, actor=actor, chunk_images=settings.chunk_images)
            note = f"resumed, {retried} failed items retried" if retried else "resumed"
        session.commit()
        return batch.id, note


def watch(sessions: sessionmaker[Session], celery: Any, settings: Settings, batch_id: str,
          worker: WorkerProcess | None, options: RunOptions, console: Console) -> None:
    """Show progress from the ledger until no item is active; keep the worker alive meanwhile."""
    total = sum(counts_of(sessions, batch_id).values())
    deadline = time.monotonic() + options.timeout if options.timeout else None
    last_sweep = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[states]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generating", total=total, states="")
        while True:
            counts = counts_of(sessions, batch_id)
            active = sum(counts[state] for state in ItemState.active())
            progress.update(task, completed=total - active, states=describe(counts))
            if not active:
                return
            if worker is not None and not worker.alive:
                revive(sessions, celery, settings, batch_id, worker, console)
            if time.monotonic() - last_sweep > SWEEP_EVERY:
                sweep(sessions, celery, settings, reclaim_dead_local=True)
                last_sweep = time.monotonic()
            if deadline and time.monotonic() > deadline:
                raise RunTrouble(f"{active} items still active after {options.timeout:.0f}s; "
                                 "run the same command again to resume")
            time.sleep(options.poll_seconds)


def revive(sessions: sessionmaker[Session], celery: Any, settings: Settings, batch_id: str, worker: WorkerProcess,
           console: Console) -> None:
    """The worker died (a crash, the OOM killer): requeue what it held and start another, a few times.

    The embedded broker does not redeliver a message its dead consumer had taken, so queued items
    get new chunks too."""
    if worker.starts > settings.max_attempts + 1:
        raise RunTrouble(f"the worker died {worker.starts} times; its last words:\n{worker.tail()}")
    console.print(f"[yellow]worker exited (code {worker.process.returncode}); requeueing its items and restarting[/]")
    with sessions() as session:
        ledger.requeue_unclaimed(session, batch_id, chunk_images=settings.chunk_images)
        session.commit()
    sweep(sessions, celery, settings, abandoned_by=worker.lease_prefix)
    worker.start()


def counts_of(sessions: sessionmaker[Session], batch_id: str) -> dict[str, int]:
    with sessions() as session:
        return ledger.state_counts(session, [batch_id])[batch_id]


def active_items(sessions: sessionmaker[Session], batch_id: str) -> int:
    return sum(counts_of(sessions, batch_id)[state] for state in ItemState.active())


def describe(counts: dict[str, int]) -> str:
    return " ".join(f"{state}={n}" for state, n in counts.items() if n)


def images_of(sessions: sessionmaker[Session], batch_id: str) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Image).where(Image.batch_id == batch_id))


def print_summary(console: Console, counts: dict[str, int], images: int, generated: int, elapsed: float,
                  results: Path) -> None:
    table = Table(title="instabatch run", show_header=True)
    for state in counts:
        table.add_column(state, justify="right")
    table.add_row(*(str(n) for n in counts.values()))
    console.print(table)
    console.print(f"{images} images and {results.name} in {results.parent}")
    rate = generated / elapsed if elapsed > 0 else 0.0
    console.print(f"RESULT items={sum(counts.values())} succeeded={counts['succeeded']} images={images} "
                  f"generated={generated} seconds={elapsed:.1f} images_per_s={rate:.2f}",
                  highlight=False, soft_wrap=True)

