"""The remote workflow: ``instabatch submit`` and ``instabatch batches`` against a running API.

    instabatch submit products.csv --api https://instabatch.example.com --key $KEY --wait --download out/
    instabatch batches list|show|cancel|retry --api URL --key K

Everything goes through the typed client (``client/``). Running the same ``submit`` again after a
network error or a Ctrl-C resumes: the Idempotency-Key comes from the file and the options, so the
API hands back the same batch, and a download keeps the files it already verified.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.schemas.results import ProgressEvent
from client import ApiError, InstaBatchClient

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_API_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
console = Console()
batches_app = typer.Typer(help="Batches on a remote API: list, show, cancel, retry.", no_args_is_help=True)

ApiOption = Annotated[str, typer.Option("--api", envvar="INSTABATCH_API", help="the API's base URL")]
KeyOption = Annotated[Optional[str], typer.Option("--key", envvar="INSTABATCH_API_KEY",
                                                  help="API key (or INSTABATCH_API_KEY)")]


def submit(
    file: Annotated[Path, typer.Argument(help="CSV, JSON Lines (.jsonl) or JSON batch file", exists=True,
                                         dir_okay=False)],
    api: ApiOption,
    key: KeyOption = None,
    name: Annotated[Optional[str], typer.Option(help="batch name (default: the file's name)")] = None,
    priority: Annotated[Optional[str], typer.Option(help="low, normal or high")] = None,
    width: Annotated[Optional[int], typer.Option(help="image width")] = None,
    height: Annotated[Optional[int], typer.Option(help="image height")] = None,
    refine: Annotated[bool, typer.Option("--refine", help="polish each image with the refiner")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the batch completes")] = False,
    download: Annotated[Optional[Path], typer.Option("--download", help="then download results and images here "
                                                                        "(implies --wait)", file_okay=False)] = None,
    verdict: Annotated[Optional[list[str]], typer.Option(help="download images of this QC verdict; repeatable")] = None,
    decision: Annotated[Optional[list[str]], typer.Option(help="...or with this review decision (approved)")] = None,
) -> None:
    """Submit FILE to a remote API; with --wait a live progress bar, with --download DIR the images
    (sha256 checked) and manifest.csv. Run the same command again to resume after an interruption."""
    fields = {"name": name, "priority": priority, "width": width, "height": height, "refine": "true" if refine else None}
    with _client(api, key) as client:
        try:
            batch, created = client.submit_file(file, fields=fields)
            console.print(f"batch [bold]{batch.id}[/] {batch.name!r} ({'new' if created else 'resumed'}): "
                          f"{batch.total_items} items, {batch.total_images} images", highlight=False)
            if not (wait or download):
                raise typer.Exit(EXIT_OK)
            final = follow(client, batch.id)
            if download:
                fetch(client, batch.id, download, verdict=verdict or [], decision=decision or [])
        except ApiError as error:
            console.print(f"[red]error:[/] {error}", highlight=False)
            if error.details:
                console.print(json.dumps(error.details, indent=2, default=str), highlight=False)
            raise typer.Exit(EXIT_API_ERROR) from None
        except ValueError as error:
            console.print(f"[red]error:[/] {error}", highlight=False)
            raise typer.Exit(EXIT_API_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: run the same command again to resume (same batch, kept files)[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    failed = final.total_items - final.counts.get("succeeded", 0)
    console.print(f"RESULT batch={batch.id} status={final.status} items={final.total_items} failed={failed}",
                  highlight=False)
    raise typer.Exit(EXIT_OK if failed == 0 else EXIT_ITEMS_FAILED)


def follow(client: InstaBatchClient, batch_id: str) -> ProgressEvent:
    """A live progress bar fed by the batch's server-sent events."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[states]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("generating", total=None, states="")

        def show(event: ProgressEvent) -> None:
            states = " ".join(f"{state}={n}" for state, n in event.counts.items() if n)
            verdicts = " ".join(f"{v}={event.review.get(v, 0)}" for v in ("pass", "review", "reject")
                                if event.review.get(v))
            progress.update(task, total=event.total_items, completed=event.done_items,
                            states=f"{states} {verdicts}".strip())

        final = client.wait(batch_id, on_progress=show)
    console.print(f"batch {batch_id}: {final.status}", highlight=False)
    return final


def fetch(client: InstaBatchClient, batch_id: str, folder: Path, **filters: list[str]) -> None:
    with Progress(TextColumn("downloading"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("download", total=None)
        summary = client.download(batch_id, folder, on_file=lambda row, new: progress.advance(task), **filters)
    console.print(f"{summary.images} images in {summary.folder / 'images'}, manifest {summary.manifest}",
                  highlight=False)
    console.print(f"RESULT download_rows={summary.rows} download_images={summary.images} "
                  f"download_fetched={summary.fetched} download_kept={summary.kept}", highlight=False)


def _client(api: str, key: str | None) -> InstaBatchClient:
    return InstaBatchClient(api, key)


def _run(api: str, key: str | None, action) -> None:
    with _client(api, key) as client:
        try:
            action(client)
        except ApiError as error:
            console.print(f"[red]error:[/] {error}", highlight=False)
            raise typer.Exit(EXIT_API_ERROR) from None


@batches_app.command("list")
def batches_list(api: ApiOption, key: KeyOption = None,
                 limit: Annotated[int, typer.Option(help="how many, newest first")] = 20) -> None:
    """The newest batches: id, status, progress, name."""
    def show(client: InstaBatchClient) -> None:
        table = Table("id", "status", "done", "created", "name")
        for batch in client.batches(limit=limit).batches:
            done = sum(n for state, n in batch.counts.items() if state not in ("queued", "running"))
            table.add_row(batch.id, batch.status, f"{done}/{batch.total_items}", f"{batch.created_at:%Y-%m-%d %H:%M}",
                          batch.name)
        console.print(table)
    _run(api, key, show)


@batches_app.command("show")
def batches_show(batch_id: str, api: ApiOption, key: KeyOption = None) -> None:
    """One batch as JSON."""
    _run(api, key, lambda client: typer.echo(client.batch(batch_id).model_dump_json(indent=2)))


@batches_app.command("cancel")
def batches_cancel(batch_id: str, api: ApiOption, key: KeyOption = None) -> None:
    """Cancel the batch's queued items (running ones stop at their next check)."""
    def cancel(client: InstaBatchClient) -> None:
        result = client.cancel(batch_id)
        console.print(f"RESULT batch={batch_id} status={result.batch.status} cancelled={result.items_cancelled}",
                      highlight=False)
    _run(api, key, cancel)


@batches_app.command("retry")
def batches_retry(batch_id: str, api: ApiOption, key: KeyOption = None) -> None:
    """Queue the failed and dead items again."""
    def retry(client: InstaBatchClient) -> None:
        result = client.retry(batch_id)
        console.print(f"RESULT batch={batch_id} status={result.batch.status} requeued={result.items_requeued}",
                      highlight=False)
    _run(api, key, retry)
