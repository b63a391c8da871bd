"""The files of a model comparison (qc/compare.py): report.html, results.json, every image as a PNG
and one side-by-side sheet per prompt (qc/contact_sheet.py: a tile per model, badged with its verdict).

    out/images/<model>/<NNN>-<label>.png   one model's image of job NNN
    out/sheets/<NNN>-<label>.png           job NNN across the models, left to right in --models order
    out/results.json                       options, summaries, the rule and pick, every image's verdict
    out/report.html                        the table per model, the rule, then a row per prompt
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from qc.compare import (
    Job,
    ModelRun,
    ModelSummary,
    Recommendation,
    alignment_of,
    recommend,
    recommendation_line,
    result_line,
    summarise,
    with_speedups,
)
from qc.contact_sheet import Tile, contact_sheet

TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
SHEET_TILE = 128


def safe_name(text: str) -> str:
    """A file-name-safe form of a model name or a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def job_stem(job: Job) -> str:
    return f"{job.position:03d}-{safe_name(job.label)}"


def image_path(run: ModelRun, job: Job) -> str:
    return f"images/{safe_name(run.choice.name)}/{job_stem(job)}.png"


def report_comparison(out: Path, jobs: list[Job], runs: list[ModelRun], options: dict[str, Any], *,
                      pass_tolerance: float = 2.0, alignment_tolerance: float = 2.0
                      ) -> tuple[list[str], Recommendation]:
    """The summaries, the pick and every report file of rendered and checked runs (``instabatch compare``
    and the end of ``train reflow``); returns the ``RESULT`` lines and the recommendation."""
    summaries = with_speedups([summarise(run) for run in runs])
    recommendation = recommend(summaries, pass_tolerance=pass_tolerance, alignment_tolerance=alignment_tolerance)
    options.setdefault("finished_at", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    write_report(out, jobs, runs, summaries, recommendation, options)
    return [*(result_line(summary) for summary in summaries), recommendation_line(recommendation, summaries)], \
        recommendation


def write_report(out: Path, jobs: list[Job], runs: list[ModelRun], summaries: list[ModelSummary],
                 recommendation: Recommendation, options: dict[str, Any]) -> dict[str, Any]:
    """Write every file under ``out``; returns the results.json document."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [_job_row(job, runs) for job in jobs]
    _write_images(out, jobs, runs)
    _write_sheets(out, jobs, runs, rows)
    document = {
        "options": options,
        "models": [_summary_dict(summary, run) for summary, run in zip(summaries, runs)],
        "recommendation": asdict(recommendation),
        "images": rows,
    }
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    html = TEMPLATES.get_template("compare.html").render(
        options=options, summaries=summaries, runs=runs, recommendation=recommendation, rows=rows,
        models=[run.choice.name for run in runs])
    (out / "report.html").write_text(html)
    return document


def _job_row(job: Job, runs: list[ModelRun]) -> dict[str, Any]:
    cells = []
    for run in runs:
        outcome = run.outcomes[job.position]
        _, alignment = alignment_of(outcome)
        cells.append({"model": run.choice.name, "image": image_path(run, job),
                      "verdict": outcome.verdict if outcome is not None else "review",
                      "reasons": list(outcome.reasons) if outcome is not None else ["qc_failed"],
                      "alignment": alignment})
    return {"position": job.position, "label": job.label, "external_id": job.external_id, "prompt": job.prompt,
            "seed": job.seed, "sheet": f"sheets/{job_stem(job)}.png", "models": cells}


def _write_images(out: Path, jobs: list[Job], runs: list[ModelRun]) -> None:
    for run in runs:
        (out / "images" / safe_name(run.choice.name)).mkdir(parents=True, exist_ok=True)
        for job, image in zip(jobs, run.images):
            image.save(out / image_path(run, job), "PNG")


def _write_sheets(out: Path, jobs: list[Job], runs: list[ModelRun], rows: list[dict[str, Any]]) -> None:
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    for job, row in zip(jobs, rows):
        tiles = [Tile(run.images[job.position], cell["verdict"], _tile_label(cell))
                 for run, cell in zip(runs, row["models"])]
        sheet = contact_sheet(tiles, tile_size=SHEET_TILE, columns=len(runs),
                              title=f"{job.label} (seed {job.seed})")
        sheet.save(out / row["sheet"], "PNG")


def _tile_label(cell: dict[str, Any]) -> str:
    alignment = f" a={cell['alignment']:.0f}" if cell["alignment"] is not None else ""
    return f"{cell['model']}{alignment}"


def _summary_dict(summary: ModelSummary, run: ModelRun) -> dict[str, Any]:
    return {**asdict(summary), "path": str(run.choice.path), "weights_sha256": run.weights_sha256,
            "load_seconds": run.load_seconds, "warmup_seconds": run.warmup_seconds, "batch_size": run.batch_size,
            "params": run.choice.params.model_dump(mode="json", exclude={"logo", "model"})}
