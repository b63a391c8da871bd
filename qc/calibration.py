"""Functions behind ``instabatch qc score`` and ``instabatch qc calibrate``.

The Typer commands in ``cli/`` only parse arguments and print; the work is here
so that it is testable without a terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qc.checker import QualityChecker
from qc.images import load_image
from qc.policy import CALIBRATED_THRESHOLDS, rejudge
from qc.results import QcOutcome, ScorerResult, jsonable
from qc.settings import QcSettings

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def score_files(
    paths: Sequence[str | Path],
    prompt: str | None = None,
    settings: QcSettings | None = None,
    checker: QualityChecker | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready dict per path: verdict, reasons, pHash, metrics and thresholds.

    The files are checked as one chunk, so duplicates among them are found.  A
    file that cannot be read gets ``{"path", "error"}`` and the rest go on.
    """
    checker = checker or QualityChecker(settings)
    rows: list[dict[str, Any]] = [{"path": str(p)} for p in paths]
    images, readable = [], []
    for row, path in zip(rows, paths):
        try:
            images.append(load_image(path))
            readable.append(row)
        except (OSError, ValueError) as error:
            row["error"] = f"{type(error).__name__}: {error}"
    outcomes = checker.check(images, [prompt] * len(images)) if images else []
    for row, outcome in zip(readable, outcomes):
        row.update(_outcome_row(outcome))
    return rows


def _outcome_row(outcome: QcOutcome) -> dict[str, Any]:
    data = outcome.to_dict()
    return {
        "verdict": data["verdict"],
        "reasons": data["reasons"],
        "phash": data["phash"],
        "metrics": {r["scorer"]: r["metrics"] for r in data["results"]},
        "thresholds": {r["scorer"]: r["thresholds"] for r in data["results"] if r["thresholds"]},
        "versions": {r["scorer"]: r["version"] for r in data["results"]},
        "notes": data["notes"],
    }


def _as_outcome(row: dict[str, Any] | QcOutcome) -> QcOutcome:
    """Accept a QcOutcome, its to_dict(), or a score_files row ({scorer: metrics})."""
    if isinstance(row, QcOutcome):
        return row
    if "results" in row:
        return QcOutcome.from_dict(row)
    versions = row.get("versions") or {}
    results = [ScorerResult(name, versions.get(name, ""), dict(m)) for name, m in row.get("metrics", {}).items()]
    return QcOutcome(row.get("verdict", "pass"), list(row.get("reasons", [])), results)


def _flatten(prefix: str, metrics: dict[str, Any], out: dict[str, float]) -> None:
    for key, value in metrics.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            _flatten(name, value, out)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)


def _distribution(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    stats = {"count": len(values), "min": array.min(), "mean": array.mean(), "max": array.max()}
    stats.update({f"p{p}": v for p, v in zip(PERCENTILES, np.percentile(array, PERCENTILES))})
    return jsonable(stats)


def _flag_fraction(values: np.ndarray, threshold: float, side: str) -> float:
    return float((values < threshold).mean() if side == "low" else (values > threshold).mean())


def calibrate(
    metric_rows: Iterable[dict[str, Any] | QcOutcome],
    settings: QcSettings | None = None,
    flag_percent: float = 1.0,
) -> dict[str, Any]:
    """Distributions of every stored metric, today's verdicts, and suggested thresholds.

    A suggestion is the percentile of the batch that would flag ``flag_percent``
    percent of its images on that metric alone.  Only quality bars are suggested
    (exposure, contrast, sharpness, alignment); black, blank, NaN, duplicates and
    NSFW are absolute failures and keep their fixed thresholds.
    """
    settings = settings or QcSettings()
    scored = [row for row in metric_rows if isinstance(row, QcOutcome) or "results" in row or "metrics" in row]
    outcomes = [rejudge(_as_outcome(row), settings) for row in scored]
    columns: dict[str, list[float]] = {}
    for outcome in outcomes:
        flat: dict[str, float] = {}
        for result in outcome.results:
            _flatten(result.scorer, result.metrics, flat)
        for name, value in flat.items():
            columns.setdefault(name, []).append(value)
    return {
        "images": len(outcomes),
        "verdicts": dict(Counter(o.verdict for o in outcomes)),
        "reasons": dict(Counter(r for o in outcomes for r in o.reasons).most_common()),
        "metrics": {name: _distribution(values) for name, values in sorted(columns.items())},
        "thresholds": _suggestions(columns, settings, flag_percent),
    }


def _suggestions(columns: dict[str, list[float]], settings: QcSettings, flag_percent: float) -> dict[str, Any]:
    suggestions = {}
    for setting, (scorer, metric, side) in CALIBRATED_THRESHOLDS.items():
        values = np.asarray(columns.get(f"{scorer}.{metric}", []))
        if values.size == 0:
            continue
        current = getattr(settings, setting)
        suggested = float(np.percentile(values, flag_percent if side == "low" else 100 - flag_percent))
        suggestions[setting] = {
            "metric": f"{scorer}.{metric}",
            "bad_side": side,
            "current": current,
            "flagged_at_current": _flag_fraction(values, current, side),
            "suggested": suggested,
            "flagged_at_suggested": _flag_fraction(values, suggested, side),
        }
    return suggestions
