"""The records QC produces: plain dataclasses that round-trip through JSON.

The worker stores ``QcOutcome.to_dict()`` as JSON in the ledger; ``from_dict``
reads it back for re-judging.  Metrics are sanitised on the way out: numpy
scalars become Python numbers and non-finite floats become ``None`` (JSON has
no NaN, and PostgreSQL's jsonb refuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Verdict = Literal["pass", "review", "reject"]
VERDICT_RANK: dict[str, int] = {"pass": 0, "review": 1, "reject": 2}


def worst_verdict(verdicts: list[str]) -> str:
    return max(verdicts, key=VERDICT_RANK.__getitem__, default="pass")


def jsonable(value: Any) -> Any:
    """Convert numpy types, tuples and sets into JSON-safe Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)  # UUIDs, paths and other references the caller passed in


def phash_to_hex(value: int | None) -> str | None:
    # 64 hex digits: a 256-bit hash fits no SQL integer and no JSON number (qc.phash).
    return None if value is None else f"{value:064x}"


def phash_from_hex(value: str | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return int(value, 16)


@dataclass
class ScorerResult:
    scorer: str
    version: str
    metrics: dict[str, Any]
    thresholds: dict[str, Any] = field(default_factory=dict)
    verdict: str = "pass"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scorer": self.scorer,
            "version": self.version,
            "metrics": jsonable(self.metrics),
            "thresholds": jsonable(self.thresholds),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScorerResult:
        return cls(
            scorer=data["scorer"],
            version=str(data.get("version", "")),
            metrics=dict(data.get("metrics") or {}),
            thresholds=dict(data.get("thresholds") or {}),
            verdict=data.get("verdict", "pass"),
            reasons=list(data.get("reasons") or []),
        )


@dataclass
class QcOutcome:
    """QC of one image: the overall verdict, its reasons and every scorer's record.

    ``advisories`` are reasons that were raised and recorded but decide nothing (by default a
    product placed or sized otherwise than the prompt said); they are also in their scorer's
    ``reasons``, so a stored record keeps them."""

    verdict: str
    reasons: list[str]
    results: list[ScorerResult]
    phash: int | None = None
    notes: list[str] = field(default_factory=list)
    advisories: list[str] = field(default_factory=list)

    def result(self, scorer: str) -> ScorerResult | None:
        return next((r for r in self.results if r.scorer == scorer), None)

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {r.scorer: r.metrics for r in self.results}

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "advisories": list(self.advisories),
            "phash": phash_to_hex(self.phash),
            "results": [r.to_dict() for r in self.results],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QcOutcome:
        return cls(
            verdict=data.get("verdict", "pass"),
            reasons=list(data.get("reasons") or []),
            results=[ScorerResult.from_dict(r) for r in data.get("results") or []],
            phash=phash_from_hex(data.get("phash")),
            notes=list(data.get("notes") or []),
            advisories=list(data.get("advisories") or []),
        )
