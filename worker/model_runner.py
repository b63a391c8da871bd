"""The model as a worker process sees it: loaded once, lazily, in the process that runs tasks.

Nothing here imports torch at module import time, and nothing touches CUDA until the first
task runs: a prefork parent must never initialise CUDA (its forked children could not use it),
so the model is loaded in the process that generates (docs/architecture.md, "CUDA and prefork").
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from core.params import GenerationParams
from core.settings import Settings
from worker import metrics

log = logging.getLogger(__name__)


@dataclass
class Rendered:
    """One forward pass's output: images in input order, the safety flags, and stage timings."""

    images: list[Any]
    nsfw_flags: list[bool]
    seconds: dict[str, float]


class ModelRunner:
    """The InstaFlow pipeline (and the refiner, when a batch asks for it) of one worker process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._pipe: Any = None
        self._refiner: Any = None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            from instaflow.pipeline import InstaFlowPipeline

            started = time.perf_counter()
            self._pipe = InstaFlowPipeline.from_pretrained(self.settings.model_path, device=self.settings.device)
            seconds = time.perf_counter() - started
            metrics.model_loaded(seconds)
            log.info("loaded model %s in %.1fs", self._pipe.model_id, seconds)
        return self._pipe

    def load(self) -> None:
        """Load the model now (it loads on first use otherwise)."""
        self.pipe

    @property
    def refiner(self) -> Any:
        if self._refiner is None:
            from instaflow.refine import load_refiner

            self._refiner = load_refiner(self.settings.refiner_path, device=self.settings.device)
        return self._refiner

    @property
    def model_id(self) -> str:
        return self.pipe.model_id

    @property
    def weights_sha256(self) -> str:
        return self.pipe.weights_sha256

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], params: GenerationParams, *,
                 pad: bool = True) -> Rendered:
        """One batched forward pass (per Euler step) for all prompts; refine after it when asked.
        ``pad=False`` runs the pass at its own size (a half split off after running out of memory)."""
        self._apply_thread_limit()
        started = time.perf_counter()
        fixed = self.settings.micro_batch if self.settings.pad_micro_batch and pad else None
        out = self.pipe(
            list(prompts), list(seeds), height=params.height, width=params.width,
            num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt,
            fixed_batch_size=fixed if fixed and fixed >= len(prompts) else None,
        )
        seconds = {"generate": time.perf_counter() - started}
        images, flags = list(out.images), list(out.nsfw_flags)
        if params.refine_options:
            started = time.perf_counter()
            refined, refined_flags = self._refine(images, prompts, seeds, params.refine_options, fixed)
            images, flags = refined, [a or b for a, b in zip(flags, refined_flags)]
            seconds["refine"] = time.perf_counter() - started
        return Rendered(images=images, nsfw_flags=flags, seconds=seconds)

    def encode_ahead(self, prompts: Sequence[str], *, pad: bool = True) -> None:
        """The text encoder's pass of a coming ``generate(prompts)``, now (worker/chunk.py overlaps it)."""
        fixed = self.settings.micro_batch if self.settings.pad_micro_batch and pad else None
        self.pipe.encode_ahead(list(prompts), fixed if fixed and fixed >= len(prompts) else None)

    def _refine(self, images: list[Any], prompts: Sequence[str], seeds: Sequence[int], refine: dict[str, Any],
                fixed: int | None) -> tuple[list[Any], list[bool]]:
        """The refiner over one pass's images, padded to the same fixed batch size as the one-step pass:
        unpadded, a refined image's bytes would depend on how many images shared its pass (a retry
        that runs an item alone would store other bytes)."""
        from instaflow.pipeline import pad_batch

        count = len(images)
        padded = pad_batch(fixed if fixed and fixed >= count else None, images, prompts, seeds)
        options = {key: refine[key] for key in ("strength", "steps", "upscale") if key in refine}
        out = self.refiner.refine(*padded, **options)
        return list(out.images)[:count], list(out.nsfw_flags)[:count]

    def free_cache(self) -> None:
        """Hand cached device memory back after running out of it (a no-op without CUDA)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _apply_thread_limit(self) -> None:
        threads = self.settings.torch_threads
        if threads:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def refiner_identity(self) -> dict[str, str]:
        return {"refiner_model": self.refiner.model_id, "refiner_weights_sha256": self.refiner.weights_sha256}
