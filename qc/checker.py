"""QualityChecker: run every scorer on a chunk and judge each image.

The worker calls ``check`` on every generated chunk and stores
``outcome.to_dict()`` per image.  A scorer that cannot run (no weights, no
package) is skipped with a note on each outcome and one log line per process;
a scorer that raises is skipped the same way.  QC never fails the task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qc.alignment import AttributeJudgeScorer, ClipScorer
from qc.images import ImageInput, ImageView
from qc.phash import HashIndex
from qc.policy import RULES, apply_thresholds, outcome_from_results
from qc.results import QcOutcome, ScorerResult, phash_from_hex
from qc.safety import OpenNsfwScorer, PipelineSafetyScorer
from qc.scorers import Metrics, Scorer, ScoringBatch, default_pixel_scorers, prompts_or_none
from qc.settings import QcSettings

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()  # (scorer, reason) already logged by this process


def _log_once(scorer: str, message: str) -> None:
    if (scorer, message) not in _logged:
        _logged.add((scorer, message))
        log.warning("QC scorer %s skipped: %s", scorer, message)


def alignment_scorer(settings: QcSettings) -> Scorer | None:
    choice = settings.alignment
    if choice == "auto":
        choice = "clip" if settings.clip_path else "judge"
    if choice == "clip":
        return ClipScorer(settings.clip_path, settings.clip_device)
    if choice == "judge":
        return AttributeJudgeScorer(settings.judge_path)
    return None


def build_scorers(settings: QcSettings) -> list[Scorer]:
    scorers: list[Scorer] = [*default_pixel_scorers(), PipelineSafetyScorer()]
    if settings.nsfw_detector == "opennsfw":
        scorers.append(OpenNsfwScorer())
    aligner = alignment_scorer(settings)
    if aligner is not None:
        scorers.append(aligner)
    return scorers


class QualityChecker:
    def __init__(self, settings: QcSettings | None = None, scorers: list[Scorer] | None = None) -> None:
        self.settings = settings or QcSettings()
        self.scorers = scorers if scorers is not None else build_scorers(self.settings)
        self._unavailable: dict[str, str | None] = {}
        self.last_timings: dict[str, float] = {}  # seconds per scorer for the last check()

    def unavailable(self) -> dict[str, str]:
        """Scorers that cannot run, with why (checked once per checker)."""
        for scorer in self.scorers:
            if scorer.name not in self._unavailable:
                self._unavailable[scorer.name] = scorer.unavailable_reason()
        return {name: why for name, why in self._unavailable.items() if why}

    def check(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str | None] | None = None,
        nsfw_flags: Sequence[bool | None] | None = None,
        known_hashes: Mapping[int, Any] | Iterable[int] | HashIndex | None = None,
    ) -> list[QcOutcome]:
        """QC of one chunk; outcome i belongs to images[i].

        ``known_hashes``: pHashes of the batch's earlier images, as ints or a
        mapping hash -> reference (image id); a match names that reference.
        """
        if nsfw_flags is not None and len(nsfw_flags) != len(images):
            raise ValueError(f"{len(images)} images but {len(nsfw_flags)} nsfw flags")
        batch = ScoringBatch(
            views=[ImageView(image, self.settings.sharpness_size) for image in images],
            prompts=prompts_or_none(prompts, len(images)),
            nsfw_flags=list(nsfw_flags) if nsfw_flags is not None else None,
            known_hashes=known_hashes if isinstance(known_hashes, HashIndex) else HashIndex(known_hashes),
        )
        per_image: list[list[ScorerResult]] = [[] for _ in images]
        notes: list[str] = []
        self.last_timings = {}
        for scorer in self.scorers:
            metrics = self._run(scorer, batch, notes)
            for results, image_metrics in zip(per_image, metrics or []):
                results.append(self._judge(scorer, image_metrics))
        return [self._outcome(results, notes) for results in per_image]

    def _run(self, scorer: Scorer, batch: ScoringBatch, notes: list[str]) -> list[Metrics] | None:
        why = self.unavailable().get(scorer.name)
        if why is None and not scorer.applies(batch):
            return None
        if why is None:
            started = time.perf_counter()
            try:
                metrics = scorer.score(batch)
            except Exception as error:  # QC must not fail the task
                log.exception("QC scorer %s failed", scorer.name)
                why = f"failed: {type(error).__name__}: {error}"
            else:
                self.last_timings[scorer.name] = time.perf_counter() - started
                return metrics
        _log_once(scorer.name, why)
        notes.append(f"{scorer.name} skipped: {why}")
        return None

    def _judge(self, scorer: Scorer, metrics: Metrics) -> ScorerResult:
        if scorer.name in RULES:
            return apply_thresholds(scorer.name, scorer.version, metrics, self.settings)
        return ScorerResult(scorer.name, scorer.version, metrics)  # measured only, no rule

    def _outcome(self, results: list[ScorerResult], notes: list[str]) -> QcOutcome:
        duplicate = next((r for r in results if r.scorer == "duplicate"), None)
        phash = phash_from_hex(duplicate.metrics.get("phash")) if duplicate else None
        return outcome_from_results(results, self.settings, phash, notes)
