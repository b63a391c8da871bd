"""The pass / review / reject policy: metrics + thresholds -> reasons -> verdict.

One rule per scorer name.  A rule reads only the metrics its scorer stored and
the settings, and returns the reasons it raises with the thresholds it applied,
so ``rejudge`` can re-run it on stored metrics with other settings.

Reasons in ``settings.reject_reasons`` reject an image; reasons in
``settings.advisory_reasons`` are recorded (the scorer's record and the outcome's
``advisories``) but change no verdict; any other reason sends it to review.  Some
reasons make others redundant (a black image is also blank, dark and blurry); the
image's reason list keeps only the telling one, while each scorer's own record
keeps everything it raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from qc.results import QcOutcome, ScorerResult
from qc.settings import QcSettings

Metrics = dict[str, Any]
RuleOutput = tuple[list[str], dict[str, Any]]
Rule = Callable[[Metrics, QcSettings], RuleOutput]

# The judge's attribute names -> reason codes.
ATTRIBUTE_REASONS = {
    "kind": "wrong_object",
    "colour": "wrong_color",
    "color": "wrong_color",
    "backdrop": "wrong_backdrop",
    "placement": "wrong_placement",
    "size": "wrong_size",
}
# A mismatch the judge reads with p >= attribute_reject_prob gets this suffix (wrong_object_confident).
CONFIDENT = "_confident"
# On a dark backdrop the judge reads the requested kind and colour, but less surely than it reads
# correct products (docs/qc.md, "Subject visibility"): the tiny model's smudges and blobs.
UNSURE_ON_DARK = "unsure_on_dark"
DARK_CHECKED_ATTRIBUTES = ("kind", "colour", "color")
ALIGNMENT_REASONS = {"misaligned", UNSURE_ON_DARK} | {
    code + suffix for code in ATTRIBUTE_REASONS.values() for suffix in ("", CONFIDENT)
}
PIXEL_REASONS = {
    "black", "blank", "underexposed", "overexposed", "low_contrast", "low_visibility", "blurry", "near_duplicate",
}
SUPERSEDES: dict[str, set[str]] = {
    "non_finite": PIXEL_REASONS | ALIGNMENT_REASONS,
    "black": (PIXEL_REASONS - {"black"}) | ALIGNMENT_REASONS,
    "blank": (PIXEL_REASONS - {"black", "blank"}) | ALIGNMENT_REASONS,
    "nsfw": {"black"},  # the safety checker blacked the image out because it flagged it
    "low_contrast": {"low_visibility"},  # a flat image shows no product: the flatness is the telling reason
}


def _below(value: Any, threshold: float) -> bool:
    return value is not None and value < threshold


def _above(value: Any, threshold: float) -> bool:
    return value is not None and value > threshold


def rule_finite(m: Metrics, s: QcSettings) -> RuleOutput:
    fraction = m.get("non_finite_fraction")
    return (["non_finite"] if fraction is None or fraction > 0 else []), {"non_finite_fraction_max": 0.0}


def rule_black(m: Metrics, s: QcSettings) -> RuleOutput:
    reasons = ["black"] if m.get("luma_p99") is not None and m["luma_p99"] <= s.black_p99_max else []
    return reasons, {"black_p99_max": s.black_p99_max}


def rule_blank(m: Metrics, s: QcSettings) -> RuleOutput:
    flat = _below(m.get("luma_std"), s.blank_std_max) or _below(m.get("entropy_bits"), s.blank_entropy_max)
    return (["blank"] if flat else []), {
        "blank_std_max": s.blank_std_max,
        "blank_entropy_max": s.blank_entropy_max,
    }


def rule_exposure(m: Metrics, s: QcSettings) -> RuleOutput:
    reasons = []
    if _below(m.get("luma_mean"), s.underexposed_mean_max) or _above(m.get("clipped_low"), s.clipped_fraction_max):
        reasons.append("underexposed")
    if _above(m.get("luma_mean"), s.overexposed_mean_min) or _above(m.get("clipped_high"), s.clipped_fraction_max):
        reasons.append("overexposed")
    return reasons, {
        "underexposed_mean_max": s.underexposed_mean_max,
        "overexposed_mean_min": s.overexposed_mean_min,
        "clipped_fraction_max": s.clipped_fraction_max,
    }


def rule_contrast(m: Metrics, s: QcSettings) -> RuleOutput:
    return (["low_contrast"] if _below(m.get("rms_contrast"), s.contrast_min) else []), {
        "contrast_min": s.contrast_min
    }


def rule_visibility(m: Metrics, s: QcSettings) -> RuleOutput:
    return (["low_visibility"] if _below(m.get("subject_contrast"), s.visibility_min) else []), {
        "visibility_min": s.visibility_min
    }


def rule_sharpness(m: Metrics, s: QcSettings) -> RuleOutput:
    # The threshold only means something at the size the metric was computed at.
    return (["blurry"] if _below(m.get("laplacian_ratio"), s.sharpness_min) else []), {
        "sharpness_min": s.sharpness_min,
        "sharpness_size": m.get("size", s.sharpness_size),
    }


def rule_duplicate(m: Metrics, s: QcSettings) -> RuleOutput:
    distance, colour = m.get("nearest_distance"), m.get("nearest_colour_distance")
    close = (
        distance is not None
        and colour is not None
        and distance <= s.duplicate_max_distance
        and colour <= s.duplicate_max_colour_distance
    )
    return (["near_duplicate"] if close else []), {
        "duplicate_max_distance": s.duplicate_max_distance,
        "duplicate_max_colour_distance": s.duplicate_max_colour_distance,
    }


def rule_pipeline_safety(m: Metrics, s: QcSettings) -> RuleOutput:
    return (["nsfw"] if m.get("nsfw_flag") else []), {}


def rule_nsfw_detector(m: Metrics, s: QcSettings) -> RuleOutput:
    prob = m.get("nsfw_prob")
    return (["nsfw"] if prob is not None and prob >= s.nsfw_threshold else []), {
        "nsfw_threshold": s.nsfw_threshold
    }


def attribute_reason(attr: str, graded: Metrics, s: QcSettings) -> str | None:
    """wrong_<attr> when the judge reads another value than the prompt asked for and gives the asked
    one p < attribute_min_prob; wrong_<attr>_confident when it reads the other value with
    p >= attribute_reject_prob. An unsure reading whose best guess is the asked value is no miss."""
    seen = graded.get("seen")
    if (seen is not None and seen == graded.get("wanted")) or not _below(graded.get("p_wanted"), s.attribute_min_prob):
        return None
    code = ATTRIBUTE_REASONS.get(attr, f"wrong_{attr}")
    p_seen = graded.get("p_seen")
    return code + CONFIDENT if p_seen is not None and p_seen >= s.attribute_reject_prob else code


def on_dark_backdrop(attributes: Metrics, s: QcSettings) -> bool:
    """The judge reads the backdrop as one of ``dark_backdrops`` (only graded when the prompt names one)."""
    return (attributes.get("backdrop") or {}).get("seen") in s.dark_backdrops


def rule_attribute_alignment(m: Metrics, s: QcSettings) -> RuleOutput:
    thresholds = {"align_min_score": s.align_min_score, "attribute_min_prob": s.attribute_min_prob,
                  "attribute_reject_prob": s.attribute_reject_prob,
                  "dark_attribute_min_prob": s.dark_attribute_min_prob, "dark_backdrops": sorted(s.dark_backdrops)}
    if not m.get("checked"):
        return [], thresholds
    reasons = ["misaligned"] if _below(m.get("score"), s.align_min_score) else []
    attributes = m.get("attributes") or {}
    dark = on_dark_backdrop(attributes, s)
    for attr, graded in attributes.items():
        reason = attribute_reason(attr, graded, s)
        if reason:
            reasons.append(reason)
        elif dark and attr in DARK_CHECKED_ATTRIBUTES and _below(graded.get("p_wanted"), s.dark_attribute_min_prob):
            reasons.append(UNSURE_ON_DARK)
    return reasons, thresholds


def rule_clip_alignment(m: Metrics, s: QcSettings) -> RuleOutput:
    thresholds = {"clip_min_score": s.clip_min_score}
    if not m.get("checked"):
        return [], thresholds
    return (["misaligned"] if _below(m.get("score"), s.clip_min_score) else []), thresholds


RULES: dict[str, Rule] = {
    "finite": rule_finite,
    "black": rule_black,
    "blank": rule_blank,
    "exposure": rule_exposure,
    "contrast": rule_contrast,
    "visibility": rule_visibility,
    "sharpness": rule_sharpness,
    "duplicate": rule_duplicate,
    "pipeline_safety": rule_pipeline_safety,
    "nsfw_detector": rule_nsfw_detector,
    "attribute_alignment": rule_attribute_alignment,
    "clip_alignment": rule_clip_alignment,
}



def register_rule(scorer: str, rule: Rule) -> None:
    """Give a plug-in scorer a rule (register it at import time so rejudge finds it too)."""
    RULES[scorer] = rule


# Settings whose value is a quality bar that calibration may suggest from a batch's
# distribution: setting -> (scorer, metric, which side is bad).
CALIBRATED_THRESHOLDS: dict[str, tuple[str, str, str]] = {
    "underexposed_mean_max": ("exposure", "luma_mean", "low"),
    "overexposed_mean_min": ("exposure", "luma_mean", "high"),
    "contrast_min": ("contrast", "rms_contrast", "low"),
    "visibility_min": ("visibility", "subject_contrast", "low"),
    "sharpness_min": ("sharpness", "laplacian_ratio", "low"),
    "align_min_score": ("attribute_alignment", "score", "low"),
    "clip_min_score": ("clip_alignment", "score", "low"),
}


def verdict_for(reasons: Iterable[str], settings: QcSettings) -> str:
    reasons = [reason for reason in reasons if reason not in settings.advisory_reasons]
    if any(reason in settings.reject_reasons for reason in reasons):
        return "reject"
    return "review" if reasons else "pass"


def apply_thresholds(scorer: str, version: str, metrics: Metrics, settings: QcSettings) -> ScorerResult:
    """Apply the scorer's rule to its metrics (KeyError for a scorer without a rule)."""
    reasons, thresholds = RULES[scorer](metrics, settings)
    reasons = [r for r in dict.fromkeys(reasons) if r not in settings.ignore_reasons]
    return ScorerResult(scorer, version, metrics, thresholds, verdict_for(reasons, settings), reasons)


def combine(results: Iterable[ScorerResult], settings: QcSettings) -> tuple[str, list[str], list[str]]:
    """The image's verdict, its reasons (deduplicated, redundant ones dropped, rejects first) and its
    advisories (raised, recorded, no effect on the verdict)."""
    raised = list(dict.fromkeys(r for result in results for r in result.reasons))
    hidden = set().union(*(SUPERSEDES.get(r, set()) for r in raised)) if raised else set()
    telling = [r for r in raised if r not in hidden]
    reasons = [r for r in telling if r not in settings.advisory_reasons]
    reasons.sort(key=lambda r: r not in settings.reject_reasons)  # stable: rejects first
    advisories = [r for r in telling if r in settings.advisory_reasons]
    return verdict_for(reasons, settings), reasons, advisories


def outcome_from_results(
    results: list[ScorerResult], settings: QcSettings, phash: int | None = None, notes: list[str] | None = None
) -> QcOutcome:
    verdict, reasons, advisories = combine(results, settings)
    return QcOutcome(verdict, reasons, results, phash, list(notes or []), advisories)


def rejudge(stored: QcOutcome | dict[str, Any] | list[dict[str, Any]], settings: QcSettings | None = None) -> QcOutcome:
    """Judge stored metrics again with (other) settings, without the images.

    ``stored`` is a ``QcOutcome``, its ``to_dict()`` or a list of ``ScorerResult``
    dicts.  A scorer without a rule here keeps its stored verdict and reasons.
    """
    settings = settings or QcSettings()
    if isinstance(stored, list):
        stored = QcOutcome("pass", [], [ScorerResult.from_dict(r) for r in stored])
    elif isinstance(stored, dict):
        stored = QcOutcome.from_dict(stored)
    notes = [n for n in stored.notes if not n.startswith("rejudge:")]
    results = []
    for old in stored.results:
        if old.scorer in RULES:
            results.append(apply_thresholds(old.scorer, old.version, old.metrics, settings))
        else:
            results.append(old)
            notes.append(f"rejudge: no rule for scorer {old.scorer!r}; its stored verdict is kept")
    return outcome_from_results(results, settings, stored.phash, notes)
