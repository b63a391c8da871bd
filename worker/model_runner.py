"""The models as a worker process sees them: each loaded once, lazily, in the process that runs tasks.

Nothing here imports torch at module import time, and nothing touches CUDA until the first
task runs: a prefork parent must never initialise CUDA (its forked children could not use it),
so the model is loaded in the process that generates (docs/architecture.md, "CUDA and prefork").

A batch names a registry model in ``params.model`` (core/registry.py); the runner loads the models
it is asked for by name and keeps at most INSTABATCH_MAX_LOADED_MODELS of them, dropping the least
recently used one past that (docs/models.md, "Registry").
"""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from core.params import GenerationParams
from core.registry import Registry, registry_for
from core.settings import Settings
from worker import metrics

log = logging.getLogger(__name__)


@dataclass
class Rendered:
    """One forward pass's output: images in input order, the safety flags, stage timings, and the
    identity of the model that made them (``ModelRunner.identity``; None: the engine serves one model)."""

    images: list[Any]
    nsfw_flags: list[bool]
    seconds: dict[str, float]
    identity: dict[str, str] | None = None


class ModelRunner:
    """The registry's InstaFlow pipelines (and the refiner, when a batch asks for it) of one worker process."""

    def __init__(self, settings: Settings, registry: Registry | None = None):
        self.settings = settings
        self.registry = registry or registry_for(settings)
        self._pipes: OrderedDict[str, Any] = OrderedDict()  # registry name -> pipeline, least recent first
        self._refiner: Any = None
        self.loads: Counter[str] = Counter()  # loads per registry name: a bound too small shows as reloads
        self.load_events: list[tuple[str, float]] = []  # (name, seconds), drained by a device process (worker/device.py)

    def pipeline(self, name: str | None = None) -> Any:
        """The named model's pipeline (None or "default": the registry's default), loaded on first use."""
        name = self.registry.resolve(name)
        if name in self._pipes:
            self._pipes.move_to_end(name)
            return self._pipes[name]
        pipe = self._load(name)
        self._pipes[name] = pipe
        while len(self._pipes) > self.settings.max_loaded_models:
            dropped, _ = self._pipes.popitem(last=False)
            log.info("dropped model %s (INSTABATCH_MAX_LOADED_MODELS=%d)", dropped, self.settings.max_loaded_models)
            self.free_cache()
        return pipe

    def _load(self, name: str) -> Any:
        from instaflow.pipeline import InstaFlowPipeline

        spec = self.registry.models[name]
        started = time.perf_counter()
        pipe = InstaFlowPipeline.from_pretrained(spec.path, device=self.settings.device)
        seconds = time.perf_counter() - started
        self.loads[name] += 1
        self.load_events.append((name, seconds))
        metrics.model_loaded(seconds, name)
        log.info("loaded model %s (%s, %s) in %.1fs: %.1f MB of parameters", name, spec.kind, spec.path, seconds,
                 parameter_bytes(pipe) / 1e6)
        return pipe

    @property
    def loaded(self) -> list[str]:
        """The registry names loaded now, least recently used first."""
        return list(self._pipes)

    @property
    def pipe(self) -> Any:
        """The default model's pipeline."""
        return self.pipeline(None)

    def load(self, name: str | None = None) -> None:
        """Load a model now (each loads on first use otherwise)."""
        self.pipeline(name)

    @property
    def refiner(self) -> Any:
        if self._refiner is None:
            from instaflow.refine import load_refiner

            self._refiner = load_refiner(self.settings.refiner_path, device=self.settings.device)
        return self._refiner

    def identity(self, name: str | None = None) -> dict[str, str]:
        """What provenance records of a model: its registry name and the sha256 of its weights
        (docs/models.md, "Registry")."""
        name = self.registry.resolve(name)
        return {"model": name, "weights_sha256": self.pipeline(name).weights_sha256}

    @property
    def model_id(self) -> str:
        """The default model's registry name."""
        return self.registry.default

    @property
    def weights_sha256(self) -> str:
        return self.pipe.weights_sha256

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], params: GenerationParams, *,
                 pad: bool = True, model: str | None = None) -> Rendered:
        """One batched forward pass (per Euler step) for all prompts of one model (``model``, else
        ``params.model``); refine after it when asked. ``pad=False`` runs the pass at its own size
        (a half split off after running out of memory)."""
        self._apply_thread_limit()
        name = self.registry.resolve(model if model is not None else params.model)
        pipe = self.pipeline(name)
        started = time.perf_counter()
        fixed = self.settings.micro_batch if self.settings.pad_micro_batch and pad else None
        out = pipe(
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
        metrics.sample_gpu_memory()  # here, in the process that holds the model (worker/device.py)
        return Rendered(images=images, nsfw_flags=flags, seconds=seconds,
                        identity={"model": name, "weights_sha256": pipe.weights_sha256})

    def encode_ahead(self, prompts: Sequence[str], *, pad: bool = True, model: str | None = None) -> None:
        """The text encoder's pass of a coming ``generate(prompts, model=model)``, now (worker/chunk.py
        overlaps it). Only on a model already loaded: this runs on another thread, and loading (or
        reordering the LRU) stays with ``generate`` on the chunk's own thread."""
        pipe = self._pipes.get(self.registry.resolve(model))
        if pipe is None:
            return
        fixed = self.settings.micro_batch if self.settings.pad_micro_batch and pad else None
        pipe.encode_ahead(list(prompts), fixed if fixed and fixed >= len(prompts) else None)

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


def parameter_bytes(pipe: Any) -> int:
    """Bytes of the pipeline's parameters (UNet, VAE, text encoder) at the dtype they were loaded in."""
    return sum(parameter.numel() * parameter.element_size()
               for module in (pipe.unet, pipe.vae, pipe.text_encoder) for parameter in module.parameters())
