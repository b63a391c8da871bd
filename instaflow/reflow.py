"""Reflow on your own prompts: InstaFlow's recipe from any local rectified-flow checkpoint.

    pairs      (z, x1) couplings: the teacher's Euler ODE (N steps, CFG g) over prompts x seeds
    rf2        2-rectified flow: the teacher's UNet fine-tuned on those couplings (flow matching,
               prompt dropout so the 2-RF still takes guidance)         -> OUT/2rf
    rf2_pairs  new couplings from the 2-RF's ODE, a few steps, no guidance (the guided flow is
               what rf2 learned)
    distill    one step: the 2-RF's UNet trained so one Euler step from z lands on x1
               (L2 in latent space)                                      -> OUT/one-step

The teacher is any checkpoint folder in our diffusers layout (instaflow/loading.py): its own
tokenizer and text encoder embed the prompts, its VAE sets the latent shape. Only the UNet is
trained; every other component folder is copied into OUT/2rf and OUT/one-step byte for byte,
so both are complete checkpoints the engine (instaflow/pipeline.py) and the worker load.
Stages are resumable (instaflow/training.py); the losses and the sampler are the tiny recipe's
(instaflow/tiny/flow.py). docs/models.md, "Reflow on your own prompts", has the command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from instaflow.loading import REQUIRED_COMPONENTS, ModelNotFoundError, read_model_index
from instaflow.pipeline import InstaFlowPipeline
from instaflow.tiny import flow
from instaflow.training import StageRun, loss_summary, optimise, run_stages

PAIR_SEED_BASE = 0  # pair k of a run with --seed s draws its noise from seed s * 1_000_000 + k
EVAL_SEED_BASE = 2**40  # held out: no training pair ever draws these
EVAL_PROMPTS = 16  # the evaluation's prompts: the first of the file
# Share of the time budget for each stage, of what is left when it starts (generation is cheap).
BUDGET_WEIGHTS = {"pairs": 0.2, "rf2": 0.45, "rf2_pairs": 0.05, "distill": 0.3}
# Settings that may change between a run and its resumption without making it another run.
RESUMABLE_CHANGES = ("budget_min", "threads", "device")


class ReflowError(ValueError):
    """Bad input (teacher folder, prompts, a run folder started with other settings); nothing is trained."""


@dataclass(frozen=True)
class ReflowConfig:
    pairs_per_prompt: int = 16
    teacher_steps: int = 25
    guidance: float = 2.0
    rf2_steps: int = 1000  # optimiser iterations
    rf2_pair_steps: int = 4  # Euler steps of the 2-RF's ODE for the distillation pairs
    distill_steps: int = 800  # optimiser iterations
    budget_min: float = 0.0  # the whole run; 0: no limit
    batch: int = 16  # training batch and generation batch
    lr: float = 4e-4
    prompt_dropout: float = 0.1
    ema_decay: float = 0.995
    threads: int = 1  # torch CPU threads
    seed: int = 0
    height: int | None = None  # default: the teacher's native size
    width: int | None = None
    weights_dtype: str = "float16"  # the UNet as saved (the engine loads fp32 on CPUs)
    device: str = "cpu"


# A few iterations and pairs: checks every stage in well under a minute on one core.
QUICK = ReflowConfig(pairs_per_prompt=2, teacher_steps=4, rf2_steps=8, rf2_pair_steps=2, distill_steps=8,
                     batch=8, ema_decay=0.9)


class ReflowRun(StageRun):
    """The run folder plus what every stage needs: the teacher, the prompts, the budget."""

    def __init__(self, out: Path, teacher: Path, prompts: list[str], config: ReflowConfig,
                 log: Callable[[str], None], progress: bool):
        super().__init__(out, log)
        self.teacher, self.prompts, self.config, self.progress = teacher, prompts, config, progress

    def stage_budget_min(self, name: str) -> float:
        """This stage's share of the budget left (finished stages' recorded seconds are spent); 0: none."""
        budget_s = self.config.budget_min * 60
        if budget_s <= 0:
            return 0.0
        order = list(BUDGET_WEIGHTS)
        spent = sum((self.done(stage) or {}).get("seconds", 0.0) for stage in order)
        later = order[order.index(name):]
        share = BUDGET_WEIGHTS[name] / sum(BUDGET_WEIGHTS[stage] for stage in later)
        return max(budget_s - spent, 1.0) * share / 60

    def pipeline(self, folder: Path) -> InstaFlowPipeline:
        return InstaFlowPipeline.from_pretrained(folder, device=self.config.device, dtype=torch.float32)

    def size(self, pipe: InstaFlowPipeline) -> tuple[int, int]:
        native_height, native_width = pipe.native_size
        return self.config.height or native_height, self.config.width or native_width


# -- checks ------------------------------------------------------------------------------


def check_teacher(path: Path) -> Path:
    """The teacher's folder, resolved; ReflowError naming what is wrong otherwise."""
    try:
        read_model_index(path)
    except ModelNotFoundError as error:
        raise ReflowError(f"teacher: {error}") from None
    folder = Path(path).resolve()
    missing = [name for name in REQUIRED_COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise ReflowError(f"teacher {str(path)!r} lacks the component folder(s): {', '.join(missing)}")
    if not (folder / "unet" / "config.json").is_file():
        raise ReflowError(f"teacher {str(path)!r} has no unet/config.json")
    return folder


def check_size(teacher: Path, config: ReflowConfig) -> None:
    """--height/--width must be multiples of the teacher's VAE scale factor (the engine's own rule)."""
    vae_config = json.loads((teacher / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and (value <= 0 or value % factor):
            raise ReflowError(f"--{name} must be a positive multiple of {factor} (the teacher's VAE scale factor), "
                              f"got {value}")


def _identity(teacher: Path, prompts: list[str], config: ReflowConfig) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {"teacher": str(teacher), "prompts_sha256": digest, "prompts": len(prompts), **settings}


def _check_same_run(out: Path, identity: dict) -> None:
    """A run folder resumes only the run it was started for."""
    recorded_file = out / "run.json"
    if not recorded_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        recorded_file.write_text(json.dumps(identity, indent=2))
        return
    recorded = json.loads(recorded_file.read_text())
    changed = {k: (recorded.get(k), v) for k, v in identity.items() if recorded.get(k) != v}
    if changed:
        said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ReflowError(f"{out} holds a run started with other settings ({said}): give another --out, "
                          f"or delete it to start again")


# -- saving ------------------------------------------------------------------------------


def save_checkpoint(teacher: Path, folder: Path, unet: torch.nn.Module, name: str, dtype: torch.dtype) -> Path:
    """The teacher's folder with this UNet: every other component copied unchanged; written beside, then
    renamed, so an interrupted save leaves no half checkpoint under the final name."""
    import copy

    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(teacher, partial, ignore=lambda d, names: ["unet"] if Path(d) == teacher else [])
    clone = copy.deepcopy(unet)
    # torch's own `to`: diffusers' override warns on any dtype cast of a loaded model, meant for inference.
    torch.nn.Module.to(clone, "cpu", dtype).save_pretrained(partial / "unet", safe_serialization=True)
    index = json.loads((partial / "model_index.json").read_text())
    index["_name_or_path"] = name
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def _weights_dtype(config: ReflowConfig) -> torch.dtype:
    return getattr(torch, config.weights_dtype)


def output_name(out: Path, which: str) -> str:
    """The model id the outputs are recorded under (provenance names it): '<run folder>-<which>'."""
    return f"{out.resolve().name}-{which}"


# -- pairs -------------------------------------------------------------------------------


def pair_plan(run: ReflowRun) -> tuple[list[int], list[int]]:
    """(prompt index, seed) of every pair: each prompt pairs_per_prompt times, seeds never reused. Round by
    round over the prompts, so a pairs stage the budget cuts short still covers every prompt."""
    n = run.config.pairs_per_prompt
    prompt_index = [p for _ in range(n) for p in range(len(run.prompts))]
    seeds = [run.config.seed * 1_000_000 + PAIR_SEED_BASE + k for k in range(len(prompt_index))]
    return prompt_index, seeds


def _make_pairs(run: ReflowRun, stage: str, model_dir: Path, steps: int, guidance: float) -> dict:
    """(z, x1): the model's Euler ODE through the engine's own pipeline, batch by batch, until the plan
    or the stage's budget runs out (then fewer pairs, said in done.json)."""
    from tqdm import tqdm

    pipe = run.pipeline(model_dir)
    height, width = run.size(pipe)
    prompt_index, seeds = pair_plan(run)
    budget_s = run.stage_budget_min(stage) * 60 or float("inf")
    z, x1, start = [], [], time.time()
    bar = tqdm(total=len(seeds), desc=stage, disable=not run.progress, unit="pair")
    for i in range(0, len(seeds), run.config.batch):
        if i and time.time() - start > budget_s:
            run.log(f"{stage}: the budget ran out after {i}/{len(seeds)} pairs")
            break
        chunk = slice(i, i + run.config.batch)
        prompts = [run.prompts[p] for p in prompt_index[chunk]]
        latents = pipe(prompts, seeds[chunk], height=height, width=width, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent").images
        x1.append(latents.float().cpu().clone())  # out of inference mode: a training target
        z.append(pipe.prepare_noise(seeds[chunk], height, width).float().cpu())
        bar.update(len(prompts))
    bar.close()
    n = sum(len(part) for part in z)
    torch.save({"z": torch.cat(z), "x1": torch.cat(x1), "prompt_index": torch.tensor(prompt_index[:n]),
                "seeds": seeds[:n]}, run.stage_dir(stage) / "pairs.pt")
    run.log(f"{stage}: {n} pairs, {steps} Euler steps, guidance {guidance} ({time.time() - start:.1f}s)")
    return {"n": n, "planned": len(seeds), "steps": steps, "guidance": guidance, "height": height, "width": width}


def _load_pairs(run: ReflowRun, stage: str, pipe: InstaFlowPipeline) -> dict[str, torch.Tensor]:
    """The stored pairs on the run's device, the prompts' embeddings (one per prompt, not per pair: a Stable
    Diffusion text encoder's is 77 x 768 floats) and the empty prompt's."""
    pairs = torch.load(run.stages / stage / "pairs.pt")
    device = run.config.device
    with torch.no_grad():
        prompt_embeds = torch.cat([pipe.encode_prompts(run.prompts[i : i + 256]).float()
                                   for i in range(0, len(run.prompts), 256)])
        uncond = pipe.encode_prompts([""]).float()
    return {"z": pairs["z"].to(device), "x1": pairs["x1"].to(device),
            "prompt_index": pairs["prompt_index"].to(device), "prompt_embeds": prompt_embeds, "uncond": uncond}


def _embeds(data: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    return data["prompt_embeds"][data["prompt_index"][idx]]


def _trainable_unet(pipe: InstaFlowPipeline) -> torch.nn.Module:
    return pipe.unet.requires_grad_(True).train()


# -- stages ------------------------------------------------------------------------------


def stage_pairs(run: ReflowRun, seed: int) -> dict:
    c = run.config
    return _make_pairs(run, "pairs", run.teacher, c.teacher_steps, c.guidance)


def stage_rf2(run: ReflowRun, seed: int) -> dict:
    """2-rectified flow: the teacher's UNet fine-tuned on its own (noise, ODE output) couplings."""
    c = run.config
    pipe = run.pipeline(run.teacher)
    data = _load_pairs(run, "pairs", pipe)
    unet = _trainable_unet(pipe)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(data["z"]), c.batch)).to(c.device)
        embeds = _embeds(data, idx)
        embeds[(torch.rand(len(idx), generator=gen) < c.prompt_dropout).to(c.device)] = data["uncond"][0]
        t = torch.rand(len(idx), generator=gen).to(c.device)
        return flow.rf_loss(unet, data["x1"][idx], data["z"][idx], embeds, t)

    losses = optimise("rf2", unet.parameters(), c.rf2_steps, c.lr, loss_fn, [(unet, flow.EMA(unet, c.ema_decay))],
                      run.stage_budget_min("rf2"), log=run.log, progress=run.progress)
    save_checkpoint(run.teacher, run.out / "2rf", unet.eval(), output_name(run.out, "2rf"), _weights_dtype(c))
    return {"loss": loss_summary(losses)}


def stage_rf2_pairs(run: ReflowRun, seed: int) -> dict:
    return _make_pairs(run, "rf2_pairs", run.out / "2rf", run.config.rf2_pair_steps, 1.0)


def stage_distill(run: ReflowRun, seed: int) -> dict:
    """InstaFlow: the 2-RF's ODE distilled into one step, starting from the 2-RF's UNet."""
    c = run.config
    pipe = run.pipeline(run.out / "2rf")
    data = _load_pairs(run, "rf2_pairs", pipe)
    unet = _trainable_unet(pipe)
    rng = np.random.default_rng(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(data["z"]), c.batch)).to(c.device)
        return flow.one_step_loss(unet, data["x1"][idx], data["z"][idx], _embeds(data, idx))

    losses = optimise("distill", unet.parameters(), c.distill_steps, c.lr, loss_fn,
                      [(unet, flow.EMA(unet, c.ema_decay))], run.stage_budget_min("distill"), log=run.log,
                      progress=run.progress)
    save_checkpoint(run.teacher, run.out / "one-step", unet.eval(), output_name(run.out, "one-step"),
                    _weights_dtype(c))
    return {"loss": loss_summary(losses)}


STAGES = [("pairs", stage_pairs), ("rf2", stage_rf2), ("rf2_pairs", stage_rf2_pairs), ("distill", stage_distill)]


def reflow(teacher: Path, prompts: Sequence[str], out: Path, config: ReflowConfig = ReflowConfig(),
           log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or resume) the stages; returns {stage: info}, as each stage's done.json records it."""
    prompts = [p for p in dict.fromkeys(prompts) if p.strip()]  # unique, in file order
    if not prompts:
        raise ReflowError("no prompts: the file gave no non-empty prompt")
    teacher = check_teacher(teacher)
    check_size(teacher, config)
    out = Path(out)
    _check_same_run(out, _identity(teacher, prompts, config))
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    torch.set_num_threads(config.threads)
    run = ReflowRun(out, teacher, prompts, config, log, progress)
    return run_stages(run, STAGES, config.seed)


# -- evaluation --------------------------------------------------------------------------


def evaluate(teacher: Path, one_step: Path, prompts: Sequence[str], config: ReflowConfig,
             n_prompts: int = EVAL_PROMPTS) -> dict:
    """Teacher (its ODE: teacher_steps, CFG) against the one-step model on held-out seeds.

    images/s of each (text encoding, UNet, VAE decode), and the one-step output's distance to the
    teacher's: RMS in latent space and mean absolute difference of 8-bit pixels. The teacher run
    for one step is the baseline the distillation has to beat.
    """
    prompts = list(prompts)[:n_prompts]
    seeds = [EVAL_SEED_BASE + config.seed * len(prompts) + i for i in range(len(prompts))]
    teacher_pipe = InstaFlowPipeline.from_pretrained(teacher, device=config.device, dtype=torch.float32)
    student_pipe = InstaFlowPipeline.from_pretrained(one_step, device=config.device, dtype=torch.float32)
    height = config.height or teacher_pipe.native_size[0]
    width = config.width or teacher_pipe.native_size[1]

    def generate(pipe: InstaFlowPipeline, steps: int, guidance: float) -> tuple[torch.Tensor, np.ndarray, float]:
        start = time.perf_counter()
        latents = pipe(prompts, seeds, height=height, width=width, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent").images
        with torch.inference_mode():
            pixels = pipe.decode(latents)
        return latents.float().cpu(), pixels, len(prompts) / (time.perf_counter() - start)

    reference = generate(teacher_pipe, config.teacher_steps, config.guidance)
    result: dict[str, Any] = {"prompts": len(prompts), "seeds": [seeds[0], seeds[-1]], "height": height,
                              "width": width}
    for label, pipe, steps, guidance in (("teacher", teacher_pipe, config.teacher_steps, config.guidance),
                                         ("one_step", student_pipe, 1, 0.0),
                                         ("teacher_1_step", teacher_pipe, 1, config.guidance)):
        latents, pixels, rate = reference if label == "teacher" else generate(pipe, steps, guidance)
        result[label] = {"steps": steps, "guidance": guidance, "images_per_s": round(rate, 2),
                         "latent_rmse_to_teacher": round(float((latents - reference[0]).pow(2).mean().sqrt()), 4),
                         "pixel_mae_to_teacher": round(float(np.abs(pixels - reference[1]).mean() * 255), 2)}
    return result


__all__ = ["QUICK", "ReflowConfig", "ReflowError", "STAGES", "check_size", "check_teacher", "evaluate", "reflow",
           "save_checkpoint"]
