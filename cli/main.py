"""The ``instabatch`` command.

    instabatch run FILE --out DIR      a prompt file -> images + results.csv, on the embedded defaults
    instabatch run CATALOGUE --template T.json --out DIR   a catalogue (rows x variants) instead
    instabatch preview FILE [--template T.json]            what run would submit; queues nothing
    instabatch brand show|set|logo     a team's brand rules and logo
    instabatch submit FILE --api URL   the same against a remote API (--wait, --download DIR)
    instabatch batches list|show|...   batches on a remote API
    instabatch serve / worker / beat   the API, a Celery worker (one per GPU), the sweeper's scheduler
    instabatch db upgrade              migrate the ledger
    instabatch status [--once]         live view: queues, workers, images/s, the newest batches
    instabatch keys create|revoke|list API keys
    instabatch teams limits|rotate-webhook-secret   a team's quotas and webhook secret
    instabatch canary start|status|promote|rollback  a team's candidate model on a fraction of items
    instabatch audit ... / provenance  the audit trail; where an image came from
    instabatch models                  the model registry: names a batch's params.model may use
    instabatch qc score FILES          QC verdicts for image files
    instabatch train tiny / eval tiny  the tiny model's recipe and its evaluation
    instabatch compare FILE --models a,b   the same prompts and seeds through each model: speed, QC, a pick
    instabatch train reflow            InstaFlow's recipe from a local teacher on your own prompts (cli/train.py)

Started from the same folder, ``serve``, ``worker`` and ``run`` share the embedded defaults in
``./var`` (SQLite ledger, SQLite broker, local object folder); environment variables point them
at PostgreSQL, Redis and S3 instead (see core/settings.py).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from cli.audit import audit_app, cli_actor
from cli.brand import brand_app
from cli.canary import canary_app
from cli.compare import compare
from cli.credentials import credentials_app
from cli.models import models
from cli.provenance import provenance
from cli.remote import batches_app
from cli.remote import submit as submit_command
from cli.status import status
from cli.teams import teams_app
from cli.train import reflow_command

app = typer.Typer(help="InstaBatch: bulk product images with one-step InstaFlow generation.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (the plaintext is shown once, on creation).", no_args_is_help=True)
qc_app = typer.Typer(help="Quality checks.", no_args_is_help=True)
train_app = typer.Typer(help="Train models.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(qc_app, name="qc")
app.add_typer(train_app, name="train")
train_app.command("reflow")(reflow_command)
app.add_typer(eval_app, name="eval")
app.add_typer(audit_app, name="audit")
app.add_typer(brand_app, name="brand")
app.add_typer(teams_app, name="teams")
app.add_typer(canary_app, name="canary")
app.add_typer(credentials_app, name="credentials")
app.command("provenance")(provenance)
app.command("models")(models)
app.command("submit")(submit_command)
app.add_typer(batches_app, name="batches")
app.command("status")(status)
app.command("compare")(compare)

console = Console()
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

TemplateOption = Annotated[Optional[Path], typer.Option(
    help="FILE is a catalogue (CSV with any columns, or a JSON array of rows) and this the template JSON "
         "(examples/catalogue-template.json)", exists=True, dir_okay=False)]


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="CSV (external_id,prompt,seed[,num_images]) or JSONL of prompts",
                                         exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNGs and results.csv")],
    name: Annotated[Optional[str], typer.Option(help="batch name (default: the file's name)")] = None,
    refine: Annotated[bool, typer.Option("--refine", help="polish each image with the refiner")] = False,
    refine_strength: Annotated[Optional[float], typer.Option(help="refine: 0.1-0.9, how far back it re-noises "
                                                                   "(implies --refine; default 0.3)")] = None,
    refine_steps: Annotated[Optional[int], typer.Option(help="refine: Euler steps 1-50 (implies --refine; "
                                                              "default 4)")] = None,
    refine_upscale: Annotated[Optional[int], typer.Option(help="refine: 1 or 2 (implies --refine)")] = None,
    width: Annotated[Optional[int], typer.Option(help="image width (default: the model's)")] = None,
    height: Annotated[Optional[int], typer.Option(help="image height (default: the model's)")] = None,
    steps: Annotated[int, typer.Option(help="Euler steps (1 for InstaFlow)")] = 1,
    guidance_scale: Annotated[float, typer.Option(help="> 1 turns on classifier-free guidance")] = 0.0,
    fresh: Annotated[bool, typer.Option("--fresh", help="a new batch, even if this file ran before")] = False,
    worker: Annotated[bool, typer.Option(help="start a worker (--no-worker: one is already running)")] = True,
    timeout: Annotated[Optional[float], typer.Option(help="give up after this many seconds")] = None,
    worker_app: Annotated[str, typer.Option(help="the Celery app module the worker runs", hidden=True)]
    = "worker.celery_app",
    template: TemplateOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the preview; queue nothing")] = False,
) -> None:
    """Generate every prompt of FILE into DIR: PNGs plus results.csv. Exit 1 if any item did not succeed."""
    from cli.run import RunOptions
    from cli.run import run as run_batch

    params: dict = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    params.update({key: value for key, value in (("width", width), ("height", height)) if value is not None})
    refine_options = {key: value for key, value in (("strength", refine_strength), ("steps", refine_steps),
                                                    ("upscale", refine_upscale)) if value is not None}
    if refine or refine_options:
        params["refine"] = {"enabled": True, **refine_options}
    options = RunOptions(file=file, out=out, name=name, params=params, fresh=fresh, start_worker=worker,
                         timeout=timeout, worker_app=worker_app, template=template, dry_run=dry_run)
    if not dry_run:
        _signing_key_or_exit()
    _run_cli(lambda: run_batch(options, console, actor=cli_actor()))


@app.command()
def preview(
    file: Annotated[Path, typer.Argument(help="a prompt file, or a catalogue with --template", exists=True,
                                         dir_okay=False)],
    template: TemplateOption = None,
    name: Annotated[Optional[str], typer.Option(help="batch name (default: the file's name)")] = None,
    width: Annotated[Optional[int], typer.Option(help="image width")] = None,
    height: Annotated[Optional[int], typer.Option(help="image height")] = None,
    guidance_scale: Annotated[float, typer.Option(help="> 1 turns on classifier-free guidance")] = 0.0,
) -> None:
    """What `instabatch run` would submit: the count, the first prompts, the device time, every problem.
    Queues nothing; exit 2 when the file would be refused."""
    from cli.run import RunOptions
    from cli.run import preview as preview_file

    params: dict = {"guidance_scale": guidance_scale}
    params.update({key: value for key, value in (("width", width), ("height", height)) if value is not None})
    options = RunOptions(file=file, out=Path("."), name=name, params=params, template=template)
    _run_cli(lambda: preview_file(options, console))


def _run_cli(work: Callable[[], int]) -> None:
    """Run a `run`-like command: its exit code, or a short error for bad input and trouble."""
    from cli.inputs import InputError
    from cli.run import EXIT_INTERRUPTED, EXIT_TROUBLE, RunTrouble

    try:
        code = work()
    except InputError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None
    except RunTrouble as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(EXIT_TROUBLE) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: run the same command again to resume the batch[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    db_pool_size: Annotated[Optional[int], typer.Option(
        help="database connections per process, and as many requests at the database and threads "
             "(default: DB_POOL_SIZE, 10); a process opens at most this + 2", min=1)] = None,
) -> None:
    """The HTTP API (uvicorn api.main:app). Migrates an embedded SQLite ledger first."""
    import uvicorn

    if db_pool_size is not None:
        os.environ["DB_POOL_SIZE"] = str(db_pool_size)  # read by the app (and by each worker process)
        from core.settings import get_settings

        get_settings.cache_clear()
    _migrate_embedded()
    # log_config=None: uvicorn's own records go to the root logger, which the app's lifespan
    # points at structlog's JSON formatter (core/logs.py).
    uvicorn.run("api.main:app", host=host, port=port, workers=workers, proxy_headers=True, log_config=None)


@app.command("worker")
def worker_command(
    pool: Annotated[str, typer.Option(help="solo: one process per GPU (recommended); prefork: time limits")] = "solo",
    concurrency: Annotated[int, typer.Option(help="processes (prefork) or threads")] = 1,
    queues: Annotated[Optional[str], typer.Option(help="comma-separated queues (default: all generate + maintenance)")] = None,
    beat: Annotated[bool, typer.Option(help="also run the sweeper's schedule in this worker")] = False,
    loglevel: Annotated[str, typer.Option(help="log level")] = "INFO",
    celery_app: Annotated[str, typer.Option("--app", help="the Celery app module")] = "worker.celery_app",
) -> None:
    """A Celery worker. Run one per GPU (CUDA_VISIBLE_DEVICES=N) with the solo pool."""
    from cli.supervisor import worker_command as command_for
    from worker.app import WORKER_QUEUES

    _migrate_embedded()
    _signing_key_or_exit()
    command = command_for(pool=pool, concurrency=concurrency, loglevel=loglevel, beat=beat, app=celery_app,
                          queues=tuple(queues.split(",")) if queues else WORKER_QUEUES)
    os.execv(sys.executable, command)  # signals go straight to Celery (warm shutdown on SIGTERM)


def _signing_key_or_exit() -> None:
    """A worker without its signing key stops here, with what to set, before any item is claimed."""
    from cli.credentials import announce_signing
    from core.credentials import CredentialsError, load_signers
    from core.settings import get_settings

    try:
        announce_signing(get_settings(), console)
        load_signers(get_settings())
    except CredentialsError as error:
        console.print(f"[red]error:[/] Content Credentials: {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="log level")] = "INFO") -> None:
    """Celery beat: schedules the sweeper (expired leases, pending outbox chunks). Run exactly one."""
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel", loglevel])


@app.command("sweep")
def sweep_command() -> None:
    """One sweeper pass now: requeue expired leases, publish pending chunks, close finished batches."""
    from core.db import get_engine, session_factory
    from core.settings import get_settings
    from worker.app import create_app
    from worker.sweeper import sweep

    settings = get_settings()
    report = sweep(session_factory(get_engine()), create_app(settings), settings)
    console.print(f"RESULT requeued={len(report.requeued)} dead={len(report.dead)} dispatched={report.dispatched} "
                  f"completed_batches={len(report.completed_batches)}", highlight=False)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Option(help="target revision")] = "head") -> None:
    """Apply the migrations (PostgreSQL or SQLite)."""
    from core.migrate import upgrade
    from core.settings import get_settings

    upgrade(revision=revision)
    console.print(f"database at {revision}: {_safe_url(get_settings().database_url)}", highlight=False)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="submitter, reviewer, auditor or admin")],
    team: Annotated[str, typer.Option(help="the team whose batches the key sees")],
    name: Annotated[str, typer.Option(help="who or what holds the key")],
) -> None:
    """Create an API key and print it (once: only its hash is stored)."""
    from core import keys
    from core.db import session_scope

    _migrate_embedded()
    try:
        with session_scope() as session:
            key, plaintext = keys.create_key(session, name, role, team, actor=cli_actor())
            key_id = key.id
    except keys.InvalidKeySpec as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"key id {key_id} role={role} team={team}", highlight=False)
    typer.echo(plaintext)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="the key's id or its shown prefix")]) -> None:
    """Revoke an API key."""
    from core import keys
    from core.db import session_scope

    try:
        with session_scope() as session:
            revoked = keys.revoke_key(session, key, actor=cli_actor())
            key_id, when = revoked.id, revoked.revoked_at
    except keys.UnknownKey as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"revoked {key_id} at {when}", highlight=False)


@keys_app.command("list")
def keys_list(revoked: Annotated[bool, typer.Option(help="include revoked keys")] = False) -> None:
    """The API keys, one per line, tab-separated (never their plaintext)."""
    from core import keys
    from core.db import session_scope

    typer.echo("\t".join(("id", "prefix", "name", "role", "team", "created_at", "revoked_at")))
    with session_scope() as session:
        for key in keys.list_keys(session, include_revoked=revoked):
            typer.echo("\t".join((key.id, key.prefix, key.name, key.role, key.team, str(key.created_at)[:19],
                                  str(key.revoked_at)[:19] if key.revoked_at else "")))


@qc_app.command("score")
def qc_score(
    files: Annotated[list[Path], typer.Argument(help="image files", exists=True, dir_okay=False)],
    prompt: Annotated[Optional[str], typer.Option(help="the prompt they were made from")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per file")] = False,
) -> None:
    """QC verdict, reasons and metrics of image files (checked together, so duplicates are found)."""
    from qc.calibration import score_files

    rows = score_files(files, prompt=prompt)
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row, default=str))
        else:
            reasons = ",".join(row.get("reasons") or []) or "-"
            console.print(f"{row['path']}: {row.get('verdict', 'error')} {reasons} {row.get('error', '')}".rstrip(),
                          highlight=False)
    verdicts = [row.get("verdict", "error") for row in rows]
    console.print("RESULT " + " ".join(f"{v}={verdicts.count(v)}" for v in ("pass", "review", "reject", "error")),
                  highlight=False)


@qc_app.command("rejudge")
def qc_rejudge(
    batch_id: Annotated[str, typer.Argument(help="the batch to judge again from its stored metrics")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change, write nothing")] = False,
) -> None:
    """Apply today's QC thresholds to a batch's stored metrics (no image is scored again)."""
    from qc.ledger import rejudge_batch

    _print_ledger_report(lambda session: rejudge_batch(session, batch_id, actor=cli_actor(), dry_run=dry_run).as_dict())


@qc_app.command("calibrate")
def qc_calibrate(
    batch_id: Annotated[str, typer.Argument(help="the batch whose score distributions to read")],
    flag_percent: Annotated[float, typer.Option(help="share of images each threshold should flag")] = 1.0,
) -> None:
    """Score distributions of a batch and the percentile thresholds they suggest."""
    from qc.ledger import calibrate_batch

    _print_ledger_report(lambda session: calibrate_batch(session, batch_id, flag_percent=flag_percent))


def _print_ledger_report(build: Callable[[Any], dict]) -> None:
    from core.db import session_scope
    from qc.ledger import UnknownBatch

    _migrate_embedded()
    try:
        with session_scope() as session:
            report = build(session)
    except UnknownBatch as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2, default=str))


@train_app.command("tiny", context_settings=PASSTHROUGH)
def train_tiny(ctx: typer.Context) -> None:
    """The tiny model's recipe (python -m instaflow.tiny train; options pass through, e.g. --quick)."""
    raise typer.Exit(_tiny("train", ctx.args))


@eval_app.command("tiny", context_settings=PASSTHROUGH)
def eval_tiny(ctx: typer.Context) -> None:
    """The tiny model's evaluation table (python -m instaflow.tiny eval; options pass through)."""
    raise typer.Exit(_tiny("eval", ctx.args))


def _tiny(command: str, args: list[str]) -> int:
    from instaflow.tiny.__main__ import main

    return main([command, *args]) or 0


def _migrate_embedded() -> None:
    """An embedded SQLite ledger is migrated on first use; PostgreSQL is migrated by `db upgrade`."""
    from core.migrate import upgrade
    from core.settings import get_settings

    if get_settings().uses_sqlite:
        upgrade()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
