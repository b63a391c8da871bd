"""How much QC costs per image: ``python -m bench.qc_cost [--chunks N] [--size 64]``.

Checks 32-image chunks of tiny-model renders (or PIL-drawn product shots when
the renderer is missing) and prints ``RESULT`` lines; never asserts on time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from qc.checker import QualityChecker
from qc.settings import QcSettings

CHUNK = 32


def sample_images(count: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    from instaflow.tiny.prompts import TRAIN_COMBOS, make_caption, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for _ in range(count):
        attrs = random_attributes(rng, TRAIN_COMBOS)
        image = render(attrs, rng)
        images.append(image if size == image.width else image.resize((size, size), Image.Resampling.BICUBIC))
        prompts.append(make_caption(attrs, rng))
    return images, prompts


def measure(checker: QualityChecker, images: list, prompts: list, chunks: int) -> tuple[float, dict[str, float]]:
    checker.check(images[:2], prompts[:2])  # load models, warm caches
    per_scorer: dict[str, float] = {}
    started = time.perf_counter()
    for index in range(chunks):
        part = slice(index * CHUNK, (index + 1) * CHUNK)
        checker.check(images[part], prompts[part])
        for name, seconds in checker.last_timings.items():
            per_scorer[name] = per_scorer.get(name, 0.0) + seconds
    count = chunks * CHUNK
    elapsed = time.perf_counter() - started
    return 1000 * elapsed / count, {name: 1000 * s / count for name, s in per_scorer.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    images, prompts = sample_images(args.chunks * CHUNK, args.size)
    for label, settings in [("pixels", QcSettings(alignment="none")), ("with_judge", QcSettings(alignment="judge"))]:
        checker = QualityChecker(settings)
        if checker.unavailable():
            print(f"# {label}: skipped scorers {checker.unavailable()}")
        ms, per_scorer = measure(checker, images, prompts, args.chunks)
        detail = " ".join(f"{name}={value:.3f}" for name, value in per_scorer.items())
        print(f"# {label} {args.size}x{args.size} ms/image by scorer: {detail}")
        print(f"RESULT qc_{label}_ms_per_image_{args.size}px={ms:.3f}")


if __name__ == "__main__":
    main()
