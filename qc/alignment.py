"""Prompt-image alignment: does the image show what the prompt asked for?

Two pluggable scorers:

* ``AttributeJudgeScorer`` for the tiny model: the attribute judge trained on
  renders (``instaflow.tiny.judge``) reads kind, colour, backdrop (placement,
  size) from the image, and ``parse_prompt`` says which of them the prompt asked
  for.  It only grades images at the judge's resolution and prompts in the tiny
  model's vocabulary; anything else is recorded as not checked.
* ``ClipScorer`` for real checkpoints: CLIP score (100 x cosine of image and text
  embeddings) with a CLIP folder on local disk, loaded offline.

Loaded models are cached per process (the worker builds checkers per task).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from qc.images import ImageView
from qc.scorers import Metrics, Scorer, ScoringBatch

_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()


def _cached(key: tuple[str, str], load):
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load()
        return _cache[key]


# --- the tiny model's attribute judge -------------------------------------------------


def _load_judge(path: Path | None) -> tuple[Any, str]:
    """The judge and a version naming its weights (a judge retrained is another scorer)."""
    from instaflow.tiny import DEFAULT_JUDGE_DIR
    from instaflow.tiny.judge import AttributeJudge

    folder = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    judge = AttributeJudge.load(folder)
    weights = folder / "judge.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "unknown"
    return judge, f"1+judge-{digest}"


def _label_and_probs(prediction: Any) -> tuple[str, float, dict[str, float] | None]:
    """(top label, its probability, all class probabilities if given) from one judge output."""
    if isinstance(prediction, (tuple, list)) and len(prediction) == 2:
        return str(prediction[0]), float(prediction[1]), None
    if isinstance(prediction, dict):
        probs = prediction.get("probs") or prediction.get("probabilities")
        label = prediction.get("label")
        if label is None and probs is None:  # a plain {class: probability} mapping
            probs = prediction
        if probs is not None:
            probs = {str(k): float(v) for k, v in probs.items()}
            label = label if label is not None else max(probs, key=probs.__getitem__)
        prob = prediction.get("probability", prediction.get("prob", prediction.get("p")))
        if prob is None and probs is not None:
            prob = probs[str(label)]
        return str(label), float(prob), probs
    raise TypeError(f"unexpected judge output: {prediction!r}")


def _per_image(predictions: Any, count: int) -> list[dict[str, Any]]:
    """Accept a list (one dict per image) or a dict of per-attribute lists."""
    if isinstance(predictions, dict):
        return [{attr: values[i] for attr, values in predictions.items()} for i in range(count)]
    return list(predictions)


def grade_attributes(wanted: dict[str, str | None], seen: dict[str, Any]) -> Metrics:
    """Compare requested attributes with the judge's reading of one image."""
    attributes: dict[str, dict[str, Any]] = {}
    for attr, value in wanted.items():
        if value is None or attr not in seen:
            continue  # the prompt left it open, or the judge does not read it
        label, prob, probs = _label_and_probs(seen[attr])
        if probs is not None:
            p_wanted = probs.get(value, 0.0)
        else:  # only the top label is known: the wanted one has at most the rest, and not more than it
            p_wanted = prob if label == value else min(prob, 1.0 - prob)
        attributes[attr] = {"wanted": value, "seen": label, "p_wanted": p_wanted, "p_seen": prob}
    score = sum(a["p_wanted"] for a in attributes.values()) / len(attributes) if attributes else None
    return {"checked": bool(attributes), "score": score, "attributes": attributes}


class AttributeJudgeScorer(Scorer):
    name = "attribute_alignment"

    def __init__(self, judge_path: Path | None = None) -> None:
        self.judge_path = judge_path
        self.version = "1"

    def _judge(self):
        judge, self.version = _cached(("judge", str(self.judge_path)), lambda: _load_judge(self.judge_path))
        return judge

    def unavailable_reason(self) -> str | None:
        try:
            self._judge()
            from instaflow.tiny.prompts import parse_prompt  # noqa: F401
        except Exception as error:  # weights missing or unreadable
            return f"attribute judge unavailable: {type(error).__name__}: {error}"
        return None

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        from instaflow.tiny.prompts import parse_prompt

        judge = self._judge()
        size = int(getattr(judge, "image_size", 64))
        results: list[Metrics] = []
        todo: list[tuple[int, dict[str, Any]]] = []
        for index, (view, prompt) in enumerate(zip(batch.views, batch.prompts)):
            why = self._why_not_checked(view, prompt, size)
            wanted = None if why else parse_prompt(prompt or "")
            if wanted is None:
                why = why or "prompt is outside the tiny model's vocabulary"
                results.append({"checked": False, "why": why, "score": None})
                continue
            results.append({})
            todo.append((index, wanted))
        if todo:
            predictions = _per_image(judge.predict([batch.views[i].pil for i, _ in todo]), len(todo))
            for (index, wanted), seen in zip(todo, predictions):
                results[index] = grade_attributes(wanted, seen)
        return results

    @staticmethod
    def _why_not_checked(view: ImageView, prompt: str | None, size: int) -> str | None:
        if not prompt:
            return "no prompt"
        if (view.width, view.height) != (size, size):
            return f"image is {view.size_label}; the judge reads {size}x{size} renders"
        return None


# --- CLIP score for real checkpoints --------------------------------------------------


def load_clip(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """CLIPModel and CLIPProcessor from a local folder; never touches the network."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {folder} (config.json missing)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


class ClipScorer(Scorer):
    name = "clip_alignment"
    version = "1"
    batch_size = 32

    def __init__(self, path: str | Path | None, device: str = "cpu") -> None:
        self.path = Path(path) if path is not None else None
        self.device = device

    def _model(self):
        return _cached(("clip", f"{self.path}@{self.device}"), lambda: load_clip(self.path, self.device))

    def unavailable_reason(self) -> str | None:
        if self.path is None:
            return "CLIP unavailable: QC_CLIP_PATH is not set"
        try:
            self._model()
        except Exception as error:
            return f"CLIP unavailable: {type(error).__name__}: {error}"
        return None

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        indices = [i for i, prompt in enumerate(batch.prompts) if prompt]
        results: list[Metrics] = [{"checked": False, "why": "no prompt", "score": None} for _ in batch.views]
        for start in range(0, len(indices), self.batch_size):
            part = indices[start : start + self.batch_size]
            scores = self._clip_scores([batch.views[i].pil for i in part], [batch.prompts[i] for i in part])
            for i, value in zip(part, scores):
                results[i] = {"checked": True, "score": value, "model": self.path.name}
        return results

    def _clip_scores(self, images: list, prompts: list) -> list[float]:
        import torch

        model, processor = self._model()
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        cosine = (image * text).sum(-1)
        return [100.0 * max(float(c), 0.0) for c in cosine]
