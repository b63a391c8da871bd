"""The tiny model's training recipe, InstaFlow's pipeline at small scale, stage by stage.

    judge -> data -> vae -> latents -> teacher (1-RF + text encoder)
          -> reflow_pairs (teacher ODE + CFG) -> rf2 (2-rectified flow)
          -> rf2_pairs (2-RF ODE) -> distill (one step, from 2-RF)
          -> direct (the ablation: one step distilled straight from the teacher's pairs)

Every stage writes its outputs under the run folder and then a `done.json` marker, so a
run that stops is resumed by running the same command again: finished stages are skipped.
Seeded: stage k uses seed * 100 + k.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from instaflow.tiny import flow
from instaflow.tiny.judge import train_judge
from instaflow.tiny.models import load_folder, make_unet, make_vae, n_params, save_pipeline_folder
from instaflow.tiny.prompts import TRAIN_COMBOS, caption_mentions, make_caption, random_attributes
from instaflow.tiny.render import make_dataset
from instaflow.tiny.text import load_tokenizer, save_tokenizer, text_encoder_config, tokenize
from instaflow.training import StageRun, loss_summary, lr_factor, optimise, run_stages

from instaflow.tiny import WEIGHTS_DIR  # noqa: E402
PUBLISHED = {"tiny-instaflow": "tiny-instaflow", "tiny-2rf": "tiny-2rf", "judge": "judge"}


@dataclass(frozen=True)
class Config:
    seed: int = 0
    threads: int = 1  # 2 OpenMP threads on a shared 2-core machine ran 4x slower than 1 (measured)
    n_train: int = 10000
    judge_n_train: int = 8000
    judge_n_test: int = 2000
    judge_iters: int = 700
    judge_batch: int = 64
    vae_iters: int = 3000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_budget_min: float = 25.0
    teacher_iters: int = 2500
    teacher_batch: int = 48
    teacher_lr: float = 1e-3
    teacher_budget_min: float = 30.0
    prompt_dropout: float = 0.1
    n_pairs: int = 3000
    teacher_steps: int = 16
    teacher_guidance: float = 2.0
    rf2_iters: int = 1000
    rf2_lr: float = 4e-4
    rf2_budget_min: float = 11.0
    rf2_pair_steps: int = 6
    distill_iters: int = 800
    distill_lr: float = 4e-4
    distill_budget_min: float = 7.0  # each of the two distillations
    batch: int = 48
    ema_decay: float = 0.995
    sample_batch: int = 128
    weights_dtype: str = "float16"  # what the published folders store (the engine loads fp32 on CPU)


QUICK = Config(
    threads=1, n_train=192, judge_n_train=256, judge_n_test=128, judge_iters=30, judge_batch=32,
    vae_iters=12, vae_batch=8, teacher_iters=20, teacher_batch=16, n_pairs=32, teacher_steps=4,
    rf2_iters=8, rf2_pair_steps=2, distill_iters=8, batch=16, sample_batch=32, ema_decay=0.9,
)


class Run(StageRun):
    """A run folder of the tiny recipe: stage outputs, done markers, the log and the config."""

    def __init__(self, out: Path, config: Config, log: Callable[[str], None]):
        super().__init__(out, log)
        self.config = config

    @property
    def tokenizer_dir(self) -> Path:
        return self.stages / "vae" / "tokenizer"


# The shared helpers (instaflow/training.py) under the names this recipe has always used.
_lr_factor, _loss_summary = lr_factor, loss_summary


def _optimise(run: Run, name: str, params, iters: int, lr: float, loss_fn: Callable[[int], torch.Tensor],
              ema_pairs: list[tuple[torch.nn.Module, flow.EMA]], budget_min: float = 0.0) -> list[float]:
    return optimise(name, params, iters, lr, loss_fn, ema_pairs, budget_min, log=run.log)


# -- stages ------------------------------------------------------------------------------


def stage_judge(run: Run, seed: int) -> dict:
    c = run.config
    report = train_judge(run.out / "judge", c.judge_n_train, c.judge_n_test, c.judge_iters, c.judge_batch,
                         seed, log=run.log)
    return {"test_accuracy": report["test_accuracy"], "loss": _loss_summary(report["losses"])}


def stage_data(run: Run, seed: int) -> dict:
    pixels, captions, attrs = make_dataset(run.config.n_train, seed, TRAIN_COMBOS)
    folder = run.stage_dir("data")
    np.save(folder / "pixels.npy", pixels)
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "attributes.json").write_text(json.dumps([a.as_dict() for a in attrs]))
    return {"n": len(captions)}


def _load_data(run: Run) -> tuple[np.ndarray, list[str]]:
    folder = run.stages / "data"
    return np.load(folder / "pixels.npy"), json.loads((folder / "captions.json").read_text())


def _pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _product_weight(x: torch.Tensor, weight: float = 8.0) -> torch.Tensor:
    """Per-pixel loss weight: the product covers a few percent of the image, and an unweighted
    loss let the VAE reproduce backdrops well but average product colours (red -> orange).
    Pixels unlike both the backdrop (top-left) and the table top (bottom-left) get `weight`."""
    far_back = (x - x[:, :, :2, :2].mean((2, 3), keepdim=True)).abs().sum(1, keepdim=True) > 0.25
    far_table = (x - x[:, :, -2:, :2].mean((2, 3), keepdim=True)).abs().sum(1, keepdim=True) > 0.25
    return 1.0 + (weight - 1.0) * (far_back & far_table).float()


def stage_vae(run: Run, seed: int) -> dict:
    c = run.config
    pixels, _ = _load_data(run)
    rng = np.random.default_rng(seed)
    folder = run.stage_dir("vae")
    vae = make_vae()
    warm = (folder / "vae" / "config.json").exists()  # an interrupted run left weights: continue from them
    if warm:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae")
        run.log("vae: continuing from the weights of an earlier, unfinished run of this stage")
    vae.train()

    def loss_fn(step: int) -> torch.Tensor:
        x = _pixels_tensor(pixels[rng.integers(0, len(pixels), c.vae_batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = (recon - x).abs() + (recon - x).pow(2)
        return (err * _product_weight(x)).mean() + 1e-6 * posterior.kl().mean()

    losses = _optimise(run, "vae", list(vae.parameters()), c.vae_iters, c.vae_lr, loss_fn, [], c.vae_budget_min)
    vae.eval().save_pretrained(folder / "vae")
    save_tokenizer(run.tokenizer_dir)  # built from the caption vocabulary; needs no training
    return {"loss": _loss_summary(losses), "params": n_params(vae), "warm_start": warm}


def stage_latents(run: Run, seed: int) -> dict:
    from diffusers import AutoencoderKL

    pixels, _ = _load_data(run)
    vae = AutoencoderKL.from_pretrained(run.stages / "vae" / "vae").eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(_pixels_tensor(pixels[i : i + 256])).latent_dist.mean
                             for i in range(0, len(pixels), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(run.stage_dir("latents") / "vae")
    torch.save((latents * scaling).contiguous(), run.stage_dir("latents") / "latents.pt")
    return {"scaling_factor": scaling, "latent_mean": float(latents.mean() * scaling)}


def _embedder(run: Run, text_encoder) -> Callable[[list[str]], torch.Tensor]:
    tokenizer = load_tokenizer(run.tokenizer_dir)

    @torch.no_grad()
    def embed(prompts: list[str]) -> torch.Tensor:
        return text_encoder(tokenize(tokenizer, prompts)).last_hidden_state

    return embed


def _save(run: Run, name: str, unet, vae, text_encoder, dtype: torch.dtype = torch.float32) -> Path:
    return save_pipeline_folder(run.out / name, name, unet, vae, text_encoder, run.tokenizer_dir, dtype)


def stage_teacher(run: Run, seed: int) -> dict:
    """1-rectified flow on (noise, image) pairs, jointly with the text encoder (prompt dropout for CFG)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    c = run.config
    _, captions = _load_data(run)
    latents = torch.load(run.stages / "latents" / "latents.pt")
    tokenizer = load_tokenizer(run.tokenizer_dir)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), tokenizer)).train()
    unet = make_unet(text_encoder.config.hidden_size).train()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(latents), c.teacher_batch))
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(len(idx), generator=gen) < c.prompt_dropout] = empty
        embeds = text_encoder(batch_ids).last_hidden_state
        z = torch.randn(latents[idx].shape, generator=gen)
        return flow.rf_loss(unet, latents[idx], z, embeds, torch.rand(len(idx), generator=gen))

    params = list(unet.parameters()) + list(text_encoder.parameters())
    emas = [(unet, flow.EMA(unet, c.ema_decay)), (text_encoder, flow.EMA(text_encoder, c.ema_decay))]
    losses = _optimise(run, "teacher", params, c.teacher_iters, c.teacher_lr, loss_fn, emas, c.teacher_budget_min)
    vae = AutoencoderKL.from_pretrained(run.stages / "latents" / "vae")
    _save(run, "teacher", unet.eval(), vae, text_encoder.eval())
    return {"loss": _loss_summary(losses), "unet_params": n_params(unet), "text_params": n_params(text_encoder)}


def drop_prompts(embeds: torch.Tensor, uncond: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """The prompt embeddings with a share `rate` replaced by the empty prompt's (what classifier-free
    guidance needs the model to have seen)."""
    embeds = embeds.clone()
    embeds[torch.rand(len(embeds), generator=gen) < rate] = uncond
    return embeds


def _random_captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = random_attributes(rng, TRAIN_COMBOS)
        say_place, say_size = caption_mentions(rng, 0.5)
        out.append(make_caption(attrs, rng, say_placement=say_place, say_size=say_size))
    return out


def _make_pairs(run: Run, stage: str, model_dir: Path, steps: int, guidance: float, seed: int) -> dict:
    """(z, ODE(z)) pairs from a model's Euler ODE, for training-set prompts only."""
    c = run.config
    unet, _, text_encoder, _ = load_folder(model_dir)
    embed = _embedder(run, text_encoder.eval())
    captions = _random_captions(c.n_pairs, seed)
    z = torch.randn((c.n_pairs, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    uncond = embed([""])
    x1, start = [], time.time()
    for i in range(0, c.n_pairs, c.sample_batch):
        x1.append(flow.sample(unet.eval(), z[i : i + c.sample_batch], embed(captions[i : i + c.sample_batch]),
                              uncond, steps, guidance))
        run.log(f"{stage} {i + len(x1[-1])}/{c.n_pairs} ({time.time() - start:.0f}s)")
    torch.save({"z": z, "x1": torch.cat(x1), "captions": captions}, run.stage_dir(stage) / "pairs.pt")
    return {"n": c.n_pairs, "steps": steps, "guidance": guidance}


def stage_reflow_pairs(run: Run, seed: int) -> dict:
    c = run.config
    return _make_pairs(run, "reflow_pairs", run.out / "teacher", c.teacher_steps, c.teacher_guidance, seed)


def _load_pairs(run: Run, stage: str, text_encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = torch.load(run.stages / stage / "pairs.pt")
    embed = _embedder(run, text_encoder.eval())
    return pairs["z"], pairs["x1"], torch.cat([embed(pairs["captions"][i : i + 512])
                                               for i in range(0, len(pairs["captions"]), 512)])


def stage_rf2(run: Run, seed: int) -> dict:
    """2-rectified flow: the teacher fine-tuned on its own (noise, ODE output) couplings."""
    c = run.config
    unet, vae, text_encoder, _ = load_folder(run.out / "teacher")
    z, x1, embeds = _load_pairs(run, "reflow_pairs", text_encoder)
    uncond = _embedder(run, text_encoder)([""])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    unet.train()

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(z), c.batch))
        e = drop_prompts(embeds[idx], uncond[0], c.prompt_dropout, gen)
        return flow.rf_loss(unet, x1[idx], z[idx], e, torch.rand(len(idx), generator=gen))

    losses = _optimise(run, "rf2", list(unet.parameters()), c.rf2_iters, c.rf2_lr, loss_fn,
                       [(unet, flow.EMA(unet, c.ema_decay))], c.rf2_budget_min)
    _save(run, "tiny-2rf", unet.eval(), vae, text_encoder, getattr(torch, c.weights_dtype))
    return {"loss": _loss_summary(losses)}


def stage_rf2_pairs(run: Run, seed: int) -> dict:
    return _make_pairs(run, "rf2_pairs", run.out / "tiny-2rf", run.config.rf2_pair_steps, 1.0, seed)


def _distill(run: Run, name: str, init_dir: Path, pairs_stage: str, out_name: str, seed: int,
             dtype: torch.dtype) -> dict:
    c = run.config
    unet, vae, text_encoder, _ = load_folder(init_dir)
    z, x1, embeds = _load_pairs(run, pairs_stage, text_encoder)
    rng = np.random.default_rng(seed)
    unet.train()

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(z), c.batch))
        return flow.one_step_loss(unet, x1[idx], z[idx], embeds[idx])

    losses = _optimise(run, name, list(unet.parameters()), c.distill_iters, c.distill_lr, loss_fn,
                       [(unet, flow.EMA(unet, c.ema_decay))], c.distill_budget_min)
    _save(run, out_name, unet.eval(), vae, text_encoder, dtype)
    return {"loss": _loss_summary(losses)}


def stage_distill(run: Run, seed: int) -> dict:
    """InstaFlow: distil the 2-RF's ODE into one step (L2 in latent space)."""
    dtype = getattr(torch, run.config.weights_dtype)
    return _distill(run, "distill", run.out / "tiny-2rf", "rf2_pairs", "tiny-instaflow", seed, dtype)


def stage_direct(run: Run, seed: int) -> dict:
    """The ablation: distil the 1-RF teacher's ODE into one step directly, same budget."""
    return _distill(run, "direct", run.out / "teacher", "reflow_pairs", "direct-distill", seed, torch.float32)


STAGES: list[tuple[str, Callable[[Run, int], dict]]] = [
    ("judge", stage_judge), ("data", stage_data), ("vae", stage_vae), ("latents", stage_latents),
    ("teacher", stage_teacher), ("reflow_pairs", stage_reflow_pairs), ("rf2", stage_rf2),
    ("rf2_pairs", stage_rf2_pairs), ("distill", stage_distill), ("direct", stage_direct),
]


def train(out: Path | str = "var/tiny-run", quick: bool = False, publish: bool = False,
          log: Callable[[str], None] = print, config: Config | None = None,
          overrides: dict[str, str] | None = None) -> dict:
    """Run (or resume) the whole recipe; returns {stage: info} including seconds per stage.

    `publish=True` copies tiny-instaflow, tiny-2rf and judge into instaflow/weights/.
    """
    config = config or (QUICK if quick else Config())
    if overrides:  # e.g. {"distill_iters": "300"}, typed after the field's default
        config = replace(config, **{k: type(getattr(config, k))(v) for k, v in overrides.items()})
    torch.set_num_threads(config.threads)
    run = Run(Path(out), config, log)
    (run.out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    summary = run_stages(run, STAGES, config.seed)
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if publish:
        publish_weights(run.out)
    return summary


def publish_weights(run_out: Path, weights_dir: Path = WEIGHTS_DIR) -> None:
    for src, dst in PUBLISHED.items():
        target = weights_dir / dst
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(run_out / src, target)


__all__ = ["Config", "QUICK", "train", "publish_weights", "replace"]
