"""Compare registered models on the same prompts and seeds: speed, QC rates, alignment, a pick.

A customer's quality study before choosing a model (docs/models.md, "PoC: compare"): every model
renders every prompt with the same seed, micro-batch by micro-batch and padded as the worker pads
(core/settings.py ``micro_batch``), so an image here is the image the service would store. Each
model's images are checked with the worker's own entry point, ``QualityChecker.check``, one
micro-batch at a time with the model's earlier images as the known hashes (a batch's duplicates),
so the pass / review / reject rates are the service's.

Alignment is what the checker's alignment scorer measured, on a 0-100 scale: the tiny model's
attribute judge (100 x the mean probability it gives the attributes the prompt asked for), or the
CLIP score (100 x cosine) when a CLIP folder is configured (QC_CLIP_PATH).

torch is imported only by the functions that render.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.params import GenerationParams, image_seed
from core.registry import Registry, UnknownModelError
from qc.checker import QualityChecker
from qc.phash import HashIndex
from qc.results import QcOutcome

ALIGNMENT_SCORERS = ("attribute_alignment", "clip_alignment")
VERDICTS = ("pass", "review", "reject")


class CompareError(ValueError):
    """The comparison cannot run as asked (a model named twice, an override for no model, bad params)."""


@dataclass(frozen=True)
class Job:
    """One image every model renders: which prompt, with which seed."""

    position: int  # in the comparison, 0-based
    item: int  # the item's row in the prompt file, 0-based
    index: int  # the image's index within its item (num_images > 1)
    prompt: str
    seed: int
    external_id: str | None = None

    @property
    def label(self) -> str:
        name = self.external_id or f"item-{self.item + 1}"
        return f"{name}.{self.index}" if self.index else name


def plan_jobs(items: Sequence[Any], base_seed: int = 0) -> list[Job]:
    """Every image of the items (``core.ledger.ItemSpec``), seeded as the worker seeds them
    (``core.params.image_seed``). An item without a seed gets ``base_seed + its row``, so every
    model and every run draws the same noise for it."""
    jobs: list[Job] = []
    for row, item in enumerate(items):
        seed = item.seed if item.seed is not None else base_seed + row
        for index in range(item.num_images):
            jobs.append(Job(len(jobs), row, index, item.prompt, image_seed(seed, index), item.external_id))
    return jobs


@dataclass(frozen=True)
class ModelChoice:
    """A registry model and the params it runs with here."""

    name: str
    path: Path
    kind: str
    params: GenerationParams


def choose_models(registry: Registry, names: Sequence[str], *, steps: dict[str | None, int] | None = None,
                  guidance: dict[str | None, float] | None = None, size: dict[str, int] | None = None
                  ) -> list[ModelChoice]:
    """The named models with their registry steps and guidance, unless overridden: an override keyed
    by a model's name applies to it, one keyed by None to every model. Raises ``UnknownModelError``
    (listing the names served) or ``CompareError``."""
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise CompareError("no models named: give --models a,b (this deployment serves "
                           + ", ".join(registry.names()) + ")")
    for name in names:
        registry.resolve(name)  # UnknownModelError lists the names served
    if len(set(names)) != len(names):
        raise CompareError(f"a model is named twice in {','.join(names)}")
    for option, overrides in (("--steps", steps), ("--guidance", guidance)):
        stray = sorted(set(overrides or {}) - set(names) - {None})
        if stray:
            raise CompareError(f"{option} names {', '.join(stray)}, which is not among the compared models")
    return [_choice(registry, name, steps or {}, guidance or {}, size or {}) for name in names]


def _choice(registry: Registry, name: str, steps: dict, guidance: dict, size: dict[str, int]) -> ModelChoice:
    spec = registry.get(name)
    # The spec's own steps and guidance, as core/params.py fills them for a batch naming the model (not
    # through params.model: that validates against the deployment's registry, not the one given here).
    wanted: dict[str, Any] = {"num_inference_steps": spec.steps, "guidance_scale": spec.guidance, **size}
    for key, overrides in (("num_inference_steps", steps), ("guidance_scale", guidance)):
        value = overrides.get(name, overrides.get(None))
        if value is not None:
            wanted[key] = value
    try:
        params = GenerationParams.model_validate(wanted)
    except ValueError as error:  # pydantic's ValidationError: the same checks as the API's
        raise CompareError(f"model {name}: {error}") from None
    if not spec.path.is_dir():
        raise CompareError(f"model {name}: its folder {spec.path} does not exist")
    return ModelChoice(name, spec.path, spec.kind, params)


# -- rendering and checking --------------------------------------------------------------------

@dataclass
class ModelRun:
    """One model's images (in job order), their QC outcomes and the time they took."""

    choice: ModelChoice
    model_id: str = ""
    weights_sha256: str = ""
    images: list[Any] = field(default_factory=list)
    nsfw_flags: list[bool] = field(default_factory=list)
    outcomes: list[QcOutcome | None] = field(default_factory=list)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    seconds: float = 0.0  # the timed pass over every job
    qc_seconds: float = 0.0
    batch_size: int = 1


def micro_batches(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    return [list(jobs[first:first + size]) for first in range(0, len(jobs), size)]


def render_model(choice: ModelChoice, jobs: Sequence[Job], *, batch_size: int, device: str | None = None,
                 torch_threads: int | None = None, repeats: int = 1,
                 on_batch: Callable[[int], None] | None = None) -> ModelRun:
    """Load the model, render one untimed warm-up micro-batch, then time every job end to end
    through the pipeline (text encoder, Euler steps, VAE decode, safety check, PIL images),
    ``repeats`` times; the fastest pass counts and the first one's images are kept."""
    import torch

    from instaflow.pipeline import InstaFlowPipeline

    if torch_threads and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)  # as the worker does (worker/model_runner.py)
    run = ModelRun(choice, batch_size=batch_size)
    started = time.perf_counter()
    pipe = InstaFlowPipeline.from_pretrained(choice.path, device=device)
    run.model_id, run.weights_sha256 = pipe.model_id, pipe.weights_sha256
    run.load_seconds = time.perf_counter() - started
    groups = micro_batches(jobs, batch_size)
    started = time.perf_counter()
    _render(pipe, groups[0], choice.params, batch_size)
    run.warmup_seconds = time.perf_counter() - started
    timings = []
    for repeat in range(max(1, repeats)):
        started = time.perf_counter()
        for group in groups:
            images, flags = _render(pipe, group, choice.params, batch_size)
            if repeat == 0:
                run.images += images
                run.nsfw_flags += flags
                if on_batch is not None:
                    on_batch(len(group))
        timings.append(time.perf_counter() - started)
    run.seconds = min(timings)  # the least disturbed pass on a shared machine
    del pipe
    return run


def _render(pipe: Any, group: Sequence[Job], params: GenerationParams, batch_size: int) -> tuple[list, list[bool]]:
    out = pipe([job.prompt for job in group], [job.seed for job in group], height=params.height,
               width=params.width, num_inference_steps=params.num_inference_steps,
               guidance_scale=params.guidance_scale, negative_prompt=params.negative_prompt,
               fixed_batch_size=batch_size)  # padded as the worker pads: the same bytes as the service's
    return list(out.images), list(out.nsfw_flags)


def check_run(checker: QualityChecker, run: ModelRun, jobs: Sequence[Job]) -> None:
    """QC the run's images micro-batch by micro-batch, as the worker does; each micro-batch sees the
    model's earlier images as the batch's known hashes."""
    known = HashIndex()
    run.outcomes = []
    started = time.perf_counter()
    for first in range(0, len(jobs), run.batch_size):
        group = slice(first, first + run.batch_size)
        outcomes = checker.check(run.images[group], [job.prompt for job in jobs[group]],
                                 nsfw_flags=run.nsfw_flags[group], known_hashes=known)
        for job, outcome in zip(jobs[group], outcomes):
            if outcome.phash is not None:
                known.add(outcome.phash, job.position)
        run.outcomes += outcomes
    run.qc_seconds = time.perf_counter() - started


def compare_models(choices: Sequence[ModelChoice], jobs: Sequence[Job], *, batch_size: int,
                   checker: QualityChecker | None = None, device: str | None = None,
                   torch_threads: int | None = None, repeats: int = 1,
                   on_model: Callable[[ModelChoice], None] | None = None,
                   on_batch: Callable[[int], None] | None = None,
                   on_done: Callable[[ModelRun], None] | None = None) -> list[ModelRun]:
    """Render and check every job with every model, one model loaded at a time."""
    checker = checker or QualityChecker()
    runs = []
    for choice in choices:
        if on_model is not None:
            on_model(choice)
        run = render_model(choice, jobs, batch_size=batch_size, device=device, torch_threads=torch_threads,
                           repeats=repeats, on_batch=on_batch)
        check_run(checker, run, jobs)
        runs.append(run)
        if on_done is not None:
            on_done(run)
    return runs


def alignment_note(checker: QualityChecker) -> str:
    """What the alignment column measures with this checker, and why CLIP is or is not in it."""
    names = {scorer.name for scorer in checker.scorers}
    missing = checker.unavailable()
    if "clip_alignment" in names and "clip_alignment" not in missing:
        return (f"CLIP score (100 x cosine of image and prompt embeddings) from the local folder "
                f"{checker.settings.clip_path} (QC_CLIP_PATH).")
    if "attribute_alignment" in names and "attribute_alignment" not in missing:
        return ("the tiny model's attribute judge (instaflow/tiny/judge.py): 100 x the mean probability it "
                "gives the kind, colour, backdrop, placement and size the prompt asked for "
                "(instaflow/tiny/prompts.py parse_prompt); prompts outside that vocabulary are not graded. "
                "CLIP is not used: no local CLIP folder is configured (QC_CLIP_PATH).")
    why = "; ".join(missing.get(name, "") for name in ALIGNMENT_SCORERS if name in missing) or "QC_ALIGNMENT=none"
    return f"not measured ({why})."


# -- summaries and the recommendation ----------------------------------------------------------

@dataclass(frozen=True)
class ModelSummary:
    name: str
    kind: str
    steps: int
    guidance: float
    model_id: str
    images: int
    seconds: float
    images_per_s: float
    seconds_per_image: float
    rates: dict[str, float]  # pass / review / reject, fractions summing to 1
    alignment: float | None  # 0-100, over the images the scorer could check
    alignment_scorer: str | None
    alignment_checked: int
    attribute_accuracy: dict[str, float]  # the judge's reading equals the prompt's, per attribute
    top_reasons: list[tuple[str, int]]
    qc_seconds_per_image: float
    speedup: float = 1.0  # images/s over the slowest model's

    @property
    def pass_rate(self) -> float:
        return self.rates["pass"]


def summarise(run: ModelRun) -> ModelSummary:
    count = len(run.images)
    verdicts = Counter(outcome.verdict if outcome is not None else "review" for outcome in run.outcomes)
    scorer, scores = alignment_scores(run.outcomes)
    reasons = Counter(reason for outcome in run.outcomes if outcome is not None for reason in outcome.reasons)
    return ModelSummary(
        name=run.choice.name, kind=run.choice.kind, steps=run.choice.params.num_inference_steps,
        guidance=float(run.choice.params.guidance_scale), model_id=run.model_id, images=count,
        seconds=run.seconds, images_per_s=count / run.seconds if run.seconds else 0.0,
        seconds_per_image=run.seconds / count if count else 0.0,
        rates={verdict: verdicts[verdict] / count if count else 0.0 for verdict in VERDICTS},
        alignment=sum(scores) / len(scores) if scores else None, alignment_scorer=scorer,
        alignment_checked=len(scores), attribute_accuracy=attribute_accuracy(run.outcomes),
        top_reasons=reasons.most_common(5), qc_seconds_per_image=run.qc_seconds / count if count else 0.0,
    )


def alignment_of(outcome: QcOutcome | None) -> tuple[str | None, float | None]:
    """(scorer, 0-100 score) of one image, (None, None) when no alignment scorer checked it."""
    for name in ALIGNMENT_SCORERS:
        result = outcome.result(name) if outcome is not None else None
        if result is not None and result.metrics.get("checked") and result.metrics.get("score") is not None:
            score = float(result.metrics["score"])
            return name, 100.0 * score if name == "attribute_alignment" else score
    return None, None


def alignment_scores(outcomes: Sequence[QcOutcome | None]) -> tuple[str | None, list[float]]:
    pairs = [alignment_of(outcome) for outcome in outcomes]
    scores = [score for _, score in pairs if score is not None]
    scorer = next((name for name, _ in pairs if name is not None), None)
    return scorer, scores


def attribute_accuracy(outcomes: Sequence[QcOutcome | None]) -> dict[str, float]:
    hits: Counter[str] = Counter()
    graded: Counter[str] = Counter()
    for outcome in outcomes:
        result = outcome.result("attribute_alignment") if outcome is not None else None
        for attr, reading in ((result.metrics.get("attributes") or {}) if result is not None else {}).items():
            graded[attr] += 1
            hits[attr] += reading.get("seen") == reading.get("wanted")
    return {attr: hits[attr] / graded[attr] for attr in graded}


def with_speedups(summaries: Sequence[ModelSummary]) -> list[ModelSummary]:
    from dataclasses import replace

    slowest = min((s.images_per_s for s in summaries if s.images_per_s > 0), default=0.0)
    return [replace(s, speedup=s.images_per_s / slowest if slowest else 1.0) for s in summaries]


@dataclass(frozen=True)
class Recommendation:
    name: str
    rule: str
    why: str
    eligible: list[str]
    excluded: dict[str, str] = field(default_factory=dict)  # model -> the bar it missed


def recommend(summaries: Sequence[ModelSummary], *, pass_tolerance: float = 2.0,
              alignment_tolerance: float = 2.0) -> Recommendation:
    """The fastest model whose pass rate is within ``pass_tolerance`` percentage points of the best
    pass rate and whose alignment is within ``alignment_tolerance`` points (0-100) of the best
    alignment. Without alignment for every model the rule reads the pass rate only."""
    if not summaries:
        raise CompareError("no models to recommend from")
    best_pass = max(s.pass_rate for s in summaries)
    aligned = all(s.alignment is not None for s in summaries)
    best_alignment = max(s.alignment for s in summaries) if aligned else None
    excluded = {s.name: why for s in summaries
                if (why := _shortfall(s, best_pass, best_alignment, pass_tolerance, alignment_tolerance))}
    eligible = [s for s in summaries if s.name not in excluded]
    pick = max(eligible, key=lambda s: s.images_per_s)
    rule = (f"the fastest model (images/s) whose pass rate is within {pass_tolerance:g} percentage points of "
            f"the best pass rate ({100 * best_pass:.1f}%)")
    rule += (f" and whose alignment is within {alignment_tolerance:g} points of the best ({best_alignment:.1f})"
             if aligned else " (alignment was not measured for every model, so it is not part of the rule)")
    why = (f"{pick.images_per_s:.2f} images/s ({pick.speedup:.1f}x the slowest), pass {100 * pick.pass_rate:.1f}%"
           + (f", alignment {pick.alignment:.1f}" if pick.alignment is not None else ""))
    return Recommendation(pick.name, rule, why, [s.name for s in eligible], excluded)


def _shortfall(summary: ModelSummary, best_pass: float, best_alignment: float | None, pass_tolerance: float,
               alignment_tolerance: float) -> str:
    """Why a model misses the bars ("" when it meets them); 1e-9 absorbs float rounding at the edge."""
    misses = []
    if 100 * (best_pass - summary.pass_rate) > pass_tolerance + 1e-9:
        misses.append(f"pass rate {100 * (best_pass - summary.pass_rate):.1f} points under the best")
    if best_alignment is not None and best_alignment - summary.alignment > alignment_tolerance + 1e-9:
        misses.append(f"alignment {best_alignment - summary.alignment:.1f} points under the best")
    return ", ".join(misses)


def result_line(summary: ModelSummary) -> str:
    alignment = f"{summary.alignment:.2f}" if summary.alignment is not None else "none"
    return (f"RESULT model={summary.name} images_per_s={summary.images_per_s:.3f} "
            f"seconds_per_image={summary.seconds_per_image:.4f} speedup={summary.speedup:.2f} "
            f"pass_rate={summary.rates['pass']:.4f} review_rate={summary.rates['review']:.4f} "
            f"reject_rate={summary.rates['reject']:.4f} alignment={alignment} images={summary.images}")


def recommendation_line(recommendation: Recommendation, summaries: Sequence[ModelSummary]) -> str:
    pick = next(s for s in summaries if s.name == recommendation.name)
    return (f"RESULT recommendation={pick.name} images_per_s={pick.images_per_s:.3f} "
            f"speedup={pick.speedup:.2f} pass_rate={pick.rates['pass']:.4f} "
            f"alignment={f'{pick.alignment:.2f}' if pick.alignment is not None else 'none'} "
            f"eligible={','.join(recommendation.eligible)}")


__all__ = ["CompareError", "Job", "ModelChoice", "ModelRun", "ModelSummary", "Recommendation",
           "UnknownModelError", "check_run", "choose_models", "plan_jobs", "recommend", "render_model",
           "summarise", "with_speedups"]
