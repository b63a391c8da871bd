"""Scorers: each measures one thing about every image of a chunk.

A scorer only measures; :mod:`qc.policy` turns its metrics into reasons with
thresholds from settings.  Keeping the two apart is what lets a stored batch be
re-judged without its images.  A scorer's ``version`` changes whenever its
metrics would change for the same image.

The scorers in this module need no weights and are always on; the model-based
ones live in :mod:`qc.alignment` and :mod:`qc.safety`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc.images import LUMA_WEIGHTS, ImageView, lab_channels
from qc.phash import DuplicateMatch, HashIndex, phash_view
from qc.results import phash_to_hex

Metrics = dict[str, Any]

# Luma at or below / above these counts as clipped shadow / highlight (1/255 of range).
CLIP_LOW = 1.0 / 255.0
CLIP_HIGH = 254.0 / 255.0
# A grey image flatter than this has no meaningful perceptual hash.
DEGENERATE_STD = 2.0 / 255.0


@dataclass
class ScoringBatch:
    """One chunk of images with what the caller knows about them."""

    views: list[ImageView]
    prompts: list[str | None]
    nsfw_flags: list[bool | None] | None = None
    known_hashes: HashIndex = field(default_factory=HashIndex)

    def __len__(self) -> int:
        return len(self.views)


class Scorer:
    """Base class.  Subclasses set ``name``/``version`` and implement ``score``."""

    name: str = "scorer"
    version: str = "1"

    def unavailable_reason(self) -> str | None:
        """None when the scorer can run; otherwise why not (missing weights, package...)."""
        return None

    def applies(self, batch: ScoringBatch) -> bool:
        """False when the batch lacks the input this scorer needs (no result is recorded)."""
        return True

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        return [self.score_one(view) for view in batch.views]

    def score_one(self, view: ImageView) -> Metrics:
        raise NotImplementedError


class FiniteScorer(Scorer):
    name = "finite"

    def score_one(self, view: ImageView) -> Metrics:
        return {"non_finite_fraction": view.non_finite_fraction}


class BlackScorer(Scorer):
    """The safety checker's replacement images are exactly black; dark photos are not."""

    name = "black"

    def score_one(self, view: ImageView) -> Metrics:
        return {"luma_p99": float(np.percentile(view.luma, 99)), "luma_max": float(view.luma.max())}


class BlankScorer(Scorer):
    name = "blank"

    def score_one(self, view: ImageView) -> Metrics:
        counts = view.luma_histogram
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        return {"luma_std": float(view.luma.std()), "entropy_bits": entropy}


class ExposureScorer(Scorer):
    name = "exposure"

    def score_one(self, view: ImageView) -> Metrics:
        luma = view.luma
        return {
            "luma_mean": float(luma.mean()),
            "clipped_low": float((luma <= CLIP_LOW).mean()),
            "clipped_high": float((luma >= CLIP_HIGH).mean()),
        }


class ContrastScorer(Scorer):
    name = "contrast"

    def score_one(self, view: ImageView) -> Metrics:
        # RMS contrast: standard deviation of luma in [0, 1].
        return {"rms_contrast": float(view.luma.std())}


class VisibilityScorer(Scorer):
    """How far the product stands out from its backdrop, in Delta E (CIE76) on a ~64 px copy.

    The backdrop is read from the image's own border: the median colour of the top rows (the
    wall) and of the bottom rows (the table top, a shade darker in product shots). Every pixel's
    distance to the nearer of the two is its contrast with the backdrop; ``subject_contrast`` is
    the 99th percentile (the product's own colour, not one stray pixel), ``subject_area`` the share
    of pixels more than ``AREA_DELTA_E`` from the backdrop, ``backdrop_luma`` the backdrop's luma.
    Global RMS contrast (``contrast``) cannot see this: a small product is a few percent of the
    pixels whatever its colour. docs/qc.md, "Subject visibility", has the figures.
    """

    name = "visibility"
    version = "1"
    border_rows = 2
    AREA_DELTA_E = 10.0

    def score_one(self, view: ImageView) -> Metrics:
        rgb = view.small_rgb
        rows = min(self.border_rows, max(1, rgb.shape[0] // 4))
        lab = lab_channels(rgb)  # 3 x pixels, row-major: the first and last rows are the border
        border = rows * rgb.shape[1]
        squared = np.minimum(*(self._squared_distance(lab, self._median(lab[:, part]))
                               for part in (slice(None, border), slice(-border, None))))
        rank = min(squared.size - 1, int(0.99 * squared.size))  # the 99th percentile, without sorting all
        backdrop_rgb = np.concatenate([rgb[:rows], rgb[-rows:]]).reshape(-1, 3).mean(axis=0)
        return {
            "subject_contrast": float(np.sqrt(np.partition(squared, rank)[rank])),
            "subject_area": float((squared > self.AREA_DELTA_E**2).mean()),
            "backdrop_luma": float(backdrop_rgb @ LUMA_WEIGHTS),
        }

    @staticmethod
    def _median(colours: np.ndarray) -> np.ndarray:
        """Per-channel median of 3 x N colours (np.median's overhead is most of its cost at this size)."""
        return np.sort(colours, axis=1)[:, colours.shape[1] // 2]

    @staticmethod
    def _squared_distance(lab: np.ndarray, colour: np.ndarray) -> np.ndarray:
        """Squared Delta E of every pixel (3 x N Lab) to one colour."""
        return (lab[0] - colour[0]) ** 2 + (lab[1] - colour[1]) ** 2 + (lab[2] - colour[2]) ** 2


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels."""
    lap = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
    )
    return float(lap.var())


class SharpnessScorer(Scorer):
    """Variance of the Laplacian, raw and relative to the image's own variance.

    Product shots range from a black product on a dark backdrop to a white one
    on white, and the raw variance follows contrast as much as focus.  The ratio
    var(Laplacian) / var(grey) measures the share of high frequencies whatever
    the contrast; the policy judges blur on it (docs/qc.md has both).  A frame of 1/32 of
    the side is left out: VAE decoders leave thin edge artifacts that pass for detail in a mush.
    """

    name = "sharpness"
    version = "2"  # 2: images over 256 px are downscaled in float, not rounded to 8 bits first

    def score_one(self, view: ImageView) -> Metrics:
        grey = view.sharpness_grey
        margin = min(grey.shape) // 32
        if margin:
            grey = grey[margin:-margin, margin:-margin]
        lap_var = laplacian_variance(grey)
        return {
            "laplacian_var": lap_var,
            "laplacian_ratio": lap_var / max(float(grey.var()), 1e-6),
            "size": view.sharpness_size,
            "native_size": view.size_label,
            "upscaled": view.upscaled,
        }


class DuplicateScorer(Scorer):
    """Perceptual hash of each image and its nearest earlier image (in this chunk or known).

    The nearest neighbour is recorded whatever its distance, so re-judging with
    other thresholds needs no images.  Only earlier images count, so of a pair
    the later one is flagged.  Flat images are left out of matching: they all
    share one degenerate hash.
    """

    name = "duplicate"
    version = "1"

    def score(self, batch: ScoringBatch) -> list[Metrics]:
        values = [phash_view(view) for view in batch.views]
        degenerate = [float(view.luma.std()) < DEGENERATE_STD for view in batch.views]
        # The known images' matches in one look-up for the chunk (one ledger query, not one per image).
        matchable = [value for value, flat in zip(values, degenerate) if not flat]
        known = iter(batch.known_hashes.nearest_many(matchable) if matchable else [])
        in_chunk = HashIndex()
        results = []
        for index, (value, flat) in enumerate(zip(values, degenerate)):
            metrics: Metrics = {"phash": phash_to_hex(value), "degenerate": flat}
            if not flat:
                metrics.update(self._nearest(in_chunk.nearest(value), next(known)))
                in_chunk.add(value, index)
            results.append(metrics)
        return results

    @staticmethod
    def _nearest(in_chunk: DuplicateMatch | None, known: DuplicateMatch | None) -> Metrics:
        candidates = [
            (match, key)
            for match, key in ((in_chunk, "twin_index"), (known, "twin_ref"))
            if match is not None
        ]
        if not candidates:
            return {"nearest_distance": None, "nearest_colour_distance": None}
        match, key = min(candidates, key=lambda c: c[0].distance + c[0].colour_distance)
        return {
            "nearest_distance": match.distance,
            "nearest_colour_distance": match.colour_distance,
            "twin_phash": phash_to_hex(match.phash),
            key: match.ref,
        }


def default_pixel_scorers() -> list[Scorer]:
    return [
        FiniteScorer(),
        BlackScorer(),
        BlankScorer(),
        ExposureScorer(),
        ContrastScorer(),
        VisibilityScorer(),
        SharpnessScorer(),
        DuplicateScorer(),
    ]


def prompts_or_none(prompts: Sequence[str | None] | None, count: int) -> list[str | None]:
    if prompts is None:
        return [None] * count
    if len(prompts) != count:
        raise ValueError(f"{count} images but {len(prompts)} prompts")
    return list(prompts)
