"""``instabatch compare PROMPTS --models a,b,c``: the same prompts and seeds through each registry model,
a report with images/s, QC pass / review / reject rates, alignment, side-by-side sheets and a pick
(qc/compare.py; docs/models.md, "PoC: compare").

Runs in this process on this machine's device (INSTABATCH_DEVICE); needs no ledger, broker or store.
stdout carries only the ``RESULT`` lines and the report's path; progress goes to stderr.
Exit 2: an unknown model (the names served are listed), a bad prompt file or option.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

progress_console = Console(stderr=True, highlight=False, soft_wrap=True)


def compare(
    prompts: Annotated[Path, typer.Argument(help="CSV (external_id,prompt,seed[,num_images]) or JSONL of prompts",
                                            exists=True, dir_okay=False)],
    models: Annotated[str | None, typer.Option(
        help="comma-separated registry names, in report order (default: every registered model but refiners)")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report folder (default: out/compare/<UTC time>)")]
    = None,
    batch_size: Annotated[int | None, typer.Option(
        help="images per forward pass (default: the worker's micro-batch, INSTABATCH_MICRO_BATCH)", min=1, max=1024)]
    = None,
    repeats: Annotated[int, typer.Option(
        help="timed passes over the prompts per model; the fastest counts (the first one's images are kept)",
        min=1)] = 1,
    seed: Annotated[int, typer.Option(help="items without a seed get this + their row number")] = 0,
    steps: Annotated[list[str] | None, typer.Option(
        help="Euler steps instead of the registry's: N for every model, or NAME=N (repeatable)",
        metavar="N|NAME=N")] = None,
    guidance: Annotated[list[str] | None, typer.Option(
        help="guidance scale instead of the registry's: G for every model, or NAME=G (repeatable)",
        metavar="G|NAME=G")] = None,
    width: Annotated[int | None, typer.Option(help="image width (default: each model's)")] = None,
    height: Annotated[int | None, typer.Option(help="image height (default: each model's)")] = None,
    pass_tolerance: Annotated[float, typer.Option(
        help="recommendation: percentage points of pass rate a model may trail the best by", min=0)] = 2.0,
    alignment_tolerance: Annotated[float, typer.Option(
        help="recommendation: alignment points (0-100) a model may trail the best by", min=0)] = 2.0,
) -> None:
    """Render PROMPTS with each model (same seeds), QC every image, time each model, recommend one."""
    from cli.inputs import InputError, read_batch
    from core.registry import RegistryError, UnknownModelError, get_registry
    from core.settings import get_settings
    from qc.compare import CompareError, choose_models, plan_jobs

    settings = get_settings()
    try:
        registry = get_registry()
        names = models.split(",") if models else [n for n in registry.names() if registry.get(n).kind != "refiner"]
        size = {key: value for key, value in (("width", width), ("height", height)) if value is not None}
        choices = choose_models(registry, names, steps=_overrides("--steps", steps, int),
                                guidance=_overrides("--guidance", guidance, float), size=size)
        spec = read_batch(prompts, name=prompts.name, params={})
    except (RegistryError, UnknownModelError, CompareError, InputError) as error:
        progress_console.print(f"[red]error:[/] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    jobs = plan_jobs(spec.items, seed)
    out = out or Path("out") / "compare" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    options = {"prompts": str(prompts), "models": [c.name for c in choices], "images": len(jobs),
               "batch_size": batch_size or settings.micro_batch, "repeats": repeats, "seed": seed,
               "device": settings.device, "pass_tolerance": pass_tolerance, "alignment_tolerance": alignment_tolerance}
    _run(choices, jobs, out, options)


def _overrides(option: str, values: list[str] | None, kind: type) -> dict[str | None, float]:
    """``N`` -> {None: N} (every model), ``NAME=N`` -> {NAME: N}."""
    from qc.compare import CompareError

    parsed: dict[str | None, float] = {}
    for value in values or []:
        name, _, number = value.rpartition("=")
        try:
            parsed[name or None] = kind(number)
        except ValueError:
            raise CompareError(f"{option} {value!r}: expected N or NAME=N") from None
    return parsed


def _run(choices: list, jobs: list, out: Path, options: dict) -> None:
    from core.settings import get_settings
    from qc.checker import QualityChecker
    from qc.compare import alignment_note, compare_models
    from qc.compare_report import report_comparison

    settings = get_settings()
    checker = QualityChecker()
    options["alignment_note"] = alignment_note(checker)
    progress_console.print(f"comparing {', '.join(c.name for c in choices)} on {len(jobs)} images "
                           f"(micro-batch {options['batch_size']}); alignment: {options['alignment_note']}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=progress_console, transient=True) as bar:
        task = bar.add_task("", total=len(jobs) * len(choices))
        runs = compare_models(
            choices, jobs, batch_size=options["batch_size"], checker=checker, device=settings.device,
            torch_threads=settings.torch_threads, repeats=options["repeats"],
            on_model=lambda choice: bar.update(task, description=f"{choice.name} ({choice.params.num_inference_steps} "
                                                                 f"steps)"),
            on_batch=lambda count: bar.advance(task, count),
            on_done=lambda run: bar.console.print(_model_line(run)))
    lines, _ = report_comparison(out, jobs, runs, options, pass_tolerance=options["pass_tolerance"],
                                 alignment_tolerance=options["alignment_tolerance"])
    for line in lines:
        typer.echo(line)
    typer.echo(f"report: {out / 'report.html'}")


def _model_line(run) -> str:
    count = len(run.images)
    verdicts = [outcome.verdict if outcome is not None else "review" for outcome in run.outcomes]
    return (f"{run.choice.name}: loaded in {run.load_seconds:.1f}s, warm-up {run.warmup_seconds:.1f}s, "
            f"{count} images in {run.seconds:.1f}s ({count / run.seconds:.2f} images/s), QC {run.qc_seconds:.1f}s: "
            + " ".join(f"{v} {verdicts.count(v)}" for v in ("pass", "review", "reject")))
