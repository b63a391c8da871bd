"""A device-speed simulation engine: the worker's model interface, at GPU rate, on a CPU machine.

``SimulatedEngine(seconds_per_image=0.004)`` answers ``generate`` with images of the requested
size after ``seconds_per_image`` × images of *sleep*: like a GPU pass, the device time leaves the
host CPU free for the other stages, so what limits throughput is the plumbing (encode, upload,
QC, ledger), which is what it measures. 4 ms per 512² image is InstaFlow-0.9B on an H100/H200
(3.33 TFLOP per image, docs/performance.md).

The images are product-photo-like (a smooth backdrop, a coloured object, a little sensor noise),
not random noise: an encoder spends on them about what it spends on real renders.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image

from core.params import GenerationParams
from worker.model_runner import Rendered

VARIANTS = 16
DEFAULT_SIDE = 512


class SimulatedEngine:
    """Drop-in for ``worker.model_runner.ModelRunner`` (set ``WorkerContext._model``)."""

    model_id = "simulated-device"
    weights_sha256 = "5" * 64

    def __init__(self, seconds_per_image: float = 0.004):
        self.seconds_per_image = seconds_per_image
        self.passes = 0

    def load(self, name: str | None = None) -> None:
        """Nothing to load."""

    def identity(self, name: str | None = None) -> dict[str, str]:
        """One simulated model, whatever the batch names."""
        return {"model": self.model_id, "weights_sha256": self.weights_sha256}

    def free_cache(self) -> None:
        """No device memory to free."""

    def refiner_identity(self) -> dict[str, str]:
        return {}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], params: GenerationParams, *,
                 pad: bool = True) -> Rendered:
        began = time.perf_counter()
        width, height = params.width or DEFAULT_SIDE, params.height or DEFAULT_SIDE
        images = [product_like(seed % VARIANTS, width, height) for seed in seeds]
        device_seconds = self.seconds_per_image * len(prompts)
        time.sleep(max(device_seconds - (time.perf_counter() - began), 0.0))
        self.passes += 1
        return Rendered(images=images, nsfw_flags=[False] * len(images),
                        seconds={"generate": time.perf_counter() - began})


@lru_cache(maxsize=4 * VARIANTS)
def product_like(variant: int, width: int, height: int) -> Image.Image:
    """A backdrop gradient, an ellipse in one of ``VARIANTS`` colours and mild noise (cached:
    the engine must cost the host nothing but the sleep)."""
    rng = np.random.default_rng(variant)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    backdrop = 200 + 40 * (y / height)[..., None] * np.array([1.0, 0.9, 0.8], dtype=np.float32)
    inside = ((x - width / 2) / (width * 0.28)) ** 2 + ((y - height * 0.55) / (height * 0.3)) ** 2 <= 1
    colour = rng.uniform(30, 220, size=3).astype(np.float32)
    shade = (0.7 + 0.3 * (x / width))[..., None]
    pixels = np.where(inside[..., None], colour * shade, backdrop)
    pixels += rng.normal(0, 3, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def describe(engine: Any) -> str:
    return f"simulated device, {engine.seconds_per_image * 1000:g} ms per image"
