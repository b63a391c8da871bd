"""`python -m instaflow.tiny eval`: the tiny model's table on held-out attribute combinations.

Every row generates through `instaflow.pipeline.InstaFlowPipeline` (the service's engine)
from a model folder, then the judge grades the images: attribute accuracy against what
the prompt asked for, and a Fréchet distance between judge features of the generated
images and of renders of the same held-out prompts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.settings import TINY_DIRECT_DIR, TINY_TEACHER_DIR
from instaflow.tiny import DEFAULT_2RF_DIR, DEFAULT_JUDGE_DIR, DEFAULT_MODEL_DIR
from instaflow.tiny.judge import AttributeJudge
from instaflow.tiny.prompts import ATTRIBUTES, BACKDROPS, PLACEMENTS, SIZES, Attributes, held_out_prompts
from instaflow.tiny.render import render

SEED_BASE = 10_000
TIMING_BATCH = 32


@dataclass
class Row:
    label: str
    short: str  # column title on the contact sheet
    folder: Path
    steps: int
    guidance: float


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), via symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrt_psd(cov_a)
    cross = sqrt_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))


def eval_prompts(quick: bool) -> list[tuple[str, dict]]:
    return list(held_out_prompts(n_per_combo=2 if quick else 8))


def reference_renders(prompts: list[tuple[str, dict]], per_prompt: int, seed: int) -> np.ndarray:
    """Renders of what each prompt asks for; open placement/size drawn at random."""
    rng = np.random.default_rng(seed)
    out = []
    for _, want in prompts:
        for _ in range(per_prompt):
            attrs = Attributes(want["kind"], want["colour"], want["backdrop"],
                               want["placement"] or PLACEMENTS[rng.integers(3)],
                               want["size"] or SIZES[rng.integers(2)])
            out.append(np.asarray(render(attrs, rng)))
    return np.stack(out)


COMBO_ATTRIBUTES = ("kind", "colour", "backdrop")  # what the held-out split holds out


def attribute_scores(judge: AttributeJudge, pixels: np.ndarray, prompts: list[tuple[str, dict]]) -> dict:
    """`accuracy`: mean judge accuracy over kind, colour and backdrop (the held-out combination);
    `asked_accuracy`: over every attribute the prompt names (placement/size only when named);
    `all_correct`: share of images with every named attribute right; per-attribute accuracies."""
    predictions = judge.predict(pixels)
    combo_hits, asked_hits, all_right = [], [], []
    for pred, (_, want) in zip(predictions, prompts):
        asked = [a for a in ATTRIBUTES if want[a] is not None]
        ok = {a: pred[a]["label"] == want[a] for a in asked}
        combo_hits += [ok[a] for a in COMBO_ATTRIBUTES]
        asked_hits += list(ok.values())
        all_right.append(all(ok.values()))
    per_attr = {a: float(np.mean([p[a]["label"] == w[a] for p, (_, w) in zip(predictions, prompts)
                                  if w[a] is not None] or [np.nan])) for a in ATTRIBUTES}
    return {"accuracy": float(np.mean(combo_hits)), "asked_accuracy": float(np.mean(asked_hits)),
            "all_correct": float(np.mean(all_right)), "per_attribute": per_attr,
            "per_backdrop": backdrop_scores(predictions, prompts)}


def backdrop_scores(predictions: list[dict], prompts: list[tuple[str, dict]]) -> dict[str, dict]:
    """Per requested backdrop: `n` prompts, `accuracy` (mean over kind/colour/backdrop, as `accuracy`),
    `kind`, `colour`, and `all_correct` (every named attribute right). The tiny model is weakest on
    dark grey (docs/qc.md, "Subject visibility"); the overall mean hides it."""
    out = {}
    for backdrop in BACKDROPS:
        picked = [(pred, want) for pred, (_, want) in zip(predictions, prompts) if want["backdrop"] == backdrop]
        if not picked:
            continue
        hits = {a: [pred[a]["label"] == want[a] for pred, want in picked] for a in COMBO_ATTRIBUTES}
        all_right = [all(pred[a]["label"] == want[a] for a in ATTRIBUTES if want[a] is not None)
                     for pred, want in picked]
        out[backdrop] = {"n": len(picked), "accuracy": float(np.mean([h for a in COMBO_ATTRIBUTES for h in hits[a]])),
                         "kind": float(np.mean(hits["kind"])), "colour": float(np.mean(hits["colour"])),
                         "all_correct": float(np.mean(all_right))}
    return out


def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int = 32) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        seeds = [SEED_BASE + i + j for j in range(len(chunk))]
        out = pipe(chunk, seeds, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        images.append((out.images * 255).round().astype(np.uint8))
    return np.concatenate(images)


def images_per_second(pipe, steps: int, guidance: float, repeats: int) -> float:
    """End to end through the pipeline (text, noise, UNet, decode, PIL) at batch 32; best of `repeats`."""
    prompts = [p for p, _ in held_out_prompts(2)][:TIMING_BATCH]
    prompts = (prompts * TIMING_BATCH)[:TIMING_BATCH]
    pipe(prompts[:4], list(range(4)), num_inference_steps=steps, guidance_scale=guidance)  # warm-up
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        pipe(prompts, list(range(r * 100, r * 100 + TIMING_BATCH)), num_inference_steps=steps, guidance_scale=guidance)
        best = min(best, time.perf_counter() - start)
    return TIMING_BATCH / best


def evaluate(quick: bool = False, run_dir: Path | None = None, model_dir: Path | None = None,
             rf2_dir: Path | None = None, judge_dir: Path | None = None, json_out: Path | None = None,
             sheet_out: Path | None = None, teacher_guidance: float | None = None, threads: int = 2,
             max_prompts: int | None = None) -> dict:
    from instaflow.pipeline import InstaFlowPipeline

    torch.set_num_threads(threads)
    run_dir = Path(run_dir or "var/tiny-run")
    teacher_dir = _run_or_shipped(run_dir / "teacher", TINY_TEACHER_DIR)
    direct_dir = _run_or_shipped(run_dir / "direct-distill", TINY_DIRECT_DIR)
    model_dir, rf2_dir = Path(model_dir or DEFAULT_MODEL_DIR), Path(rf2_dir or DEFAULT_2RF_DIR)
    judge = AttributeJudge.load(judge_dir or DEFAULT_JUDGE_DIR)
    g = teacher_guidance or _teacher_guidance(run_dir)
    rows = [
        Row(f"teacher 1-RF, 25 steps (CFG {g:g})", "teacher 25", teacher_dir, 25, g),
        Row(f"teacher 1-RF, 1 step (CFG {g:g})", "teacher 1", teacher_dir, 1, g),
        Row("2-RF, 1 step", "2-RF 1", rf2_dir, 1, 1.0),
        Row("2-RF, 4 steps", "2-RF 4", rf2_dir, 4, 1.0),
        Row("reflow + distill, 1 step (InstaFlow)", "InstaFlow 1", model_dir, 1, 0.0),
        Row("direct distill of 1-RF, 1 step", "direct 1", direct_dir, 1, 0.0),
    ]
    prompts = eval_prompts(quick)[:max_prompts]
    texts = [p for p, _ in prompts]
    refs = reference_renders(prompts, 2 if quick else 4, seed=7)
    ref_feats = judge.features(refs)
    floor = reference_renders(prompts, 1, seed=8)
    results = {"renders (another draw)": {**attribute_scores(judge, floor, prompts),
                                          "fd": frechet_distance(judge.features(floor), ref_feats)}}
    samples: dict[str, np.ndarray] = {"render": floor}
    if (model_dir / "vae").is_dir():
        recon = vae_reconstruct(model_dir, floor)
        results["renders through the VAE"] = {**attribute_scores(judge, recon, prompts),
                                              "fd": frechet_distance(judge.features(recon), ref_feats)}
    for row in rows:
        if not (row.folder / "model_index.json").exists():
            print(f"skipping {row.label}: no model at {row.folder}")
            continue
        pipe = InstaFlowPipeline.from_pretrained(row.folder, device="cpu")
        pixels = generate(pipe, texts, row.steps, row.guidance)
        res = attribute_scores(judge, pixels, prompts)
        res["fd"] = frechet_distance(judge.features(pixels), ref_feats)
        res["img_per_s"] = images_per_second(pipe, row.steps, row.guidance, repeats=1 if quick or row.steps > 4 else 3)
        res.update(folder=str(row.folder), steps=row.steps, guidance=row.guidance)
        results[row.label] = res
        samples[row.short] = pixels
        print(f"{row.label}: {_fmt(res)}", flush=True)
    print_table(results, len(prompts))
    print_backdrop_table(results)
    result_line = make_result_line(results, rows)
    print(result_line)
    report = {"n_prompts": len(prompts), "rows": results, "result_line": result_line}
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    if sheet_out:
        contact_sheet(samples, prompts, sheet_out)
    return report


@torch.no_grad()
def vae_reconstruct(model_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """Encode and decode renders: the ceiling any generator in this latent space can reach."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, local_files_only=True)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _run_or_shipped(in_run: Path, shipped: Path) -> Path:
    """A training run's own model when there is one, else the shipped checkpoint."""
    return in_run if (in_run / "model_index.json").exists() else shipped


def _teacher_guidance(run_dir: Path) -> float:
    config = run_dir / "config.json"
    return float(json.loads(config.read_text())["teacher_guidance"]) if config.exists() else 2.0


def _fmt(res: dict) -> str:
    ips = f"{res['img_per_s']:.1f}" if "img_per_s" in res else "-"
    return f"acc {res['accuracy']:.3f} asked {res['asked_accuracy']:.3f} FD {res['fd']:.2f} img/s {ips}"


def print_table(results: dict, n: int) -> None:
    print(f"\nHeld-out combinations: {n} prompts, judge-graded. acc = mean over kind/colour/backdrop; "
          "placement and size only where the prompt names them; FD in judge feature space")
    head = (f"| {'model':40} |   acc | kind | colour | backdrop | placement | size | all named |    FD "
            "| img/s b32 |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label, r in results.items():
        ips = f"{r['img_per_s']:.1f}" if "img_per_s" in r else "-"
        a = r["per_attribute"]
        print(f"| {label:40} | {r['accuracy']:.3f} | {a['kind']:.2f} | {a['colour']:6.2f} | {a['backdrop']:8.2f} "
              f"| {a['placement']:9.2f} | {a['size']:4.2f} | {r['all_correct']:9.3f} | {r['fd']:5.2f} | {ips:>9} |")


def print_backdrop_table(results: dict) -> None:
    """Accuracy (mean over kind/colour/backdrop) per requested backdrop, one row per model; cells read
    `acc / all named` (the share of images with every named attribute right)."""
    backdrops = [b for b in BACKDROPS if any(b in r.get("per_backdrop", {}) for r in results.values())]
    counts = next((r["per_backdrop"] for r in results.values() if r.get("per_backdrop")), {})
    print("\nPer backdrop (acc / all named; prompts per backdrop: "
          + ", ".join(f"{b} {counts[b]['n']}" for b in backdrops if b in counts) + ")")
    head = f"| {'model':40} | " + " | ".join(f"{b:>11}" for b in backdrops) + " |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for label, r in results.items():
        cells = [r.get("per_backdrop", {}).get(b) for b in backdrops]
        print(f"| {label:40} | " + " | ".join(f"{c['accuracy']:.2f} / {c['all_correct']:.2f}" if c else f"{'-':>11}"
                                              for c in cells) + " |")


def make_result_line(results: dict, rows: list[Row]) -> str:
    def get(i: int, key: str) -> str:
        r = results.get(rows[i].label)
        return "nan" if r is None else f"{r[key]:.4f}" if key != "img_per_s" else f"{r[key]:.1f}"

    return (f"RESULT onestep_accuracy={get(4, 'accuracy')} teacher25_accuracy={get(0, 'accuracy')} "
            f"onestep_fd={get(4, 'fd')} teacher25_fd={get(0, 'fd')} direct_accuracy={get(5, 'accuracy')} "
            f"onestep_img_per_s={get(4, 'img_per_s')}")


def contact_sheet(samples: dict[str, np.ndarray], prompts: list[tuple[str, dict]], path: Path,
                  n: int = 12, scale: int = 2) -> None:
    """Rows: held-out prompts (one per combination); columns: a render, then each model."""
    step = max(1, len(prompts) // n)
    picks = list(range(0, len(prompts), step))[:n]
    tile, label_w, head_h = 64 * scale, 250, 16
    columns = list(samples)
    sheet = Image.new("RGB", (label_w + tile * len(columns), head_h + tile * len(picks)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((label_w + c * tile + 4, 2), name, fill="black")
    for r, i in enumerate(picks):
        y = head_h + r * tile
        words, line, lines = prompts[i][0].split(), "", []
        for w in words:
            if len(line) + len(w) > 40:
                lines.append(line)
                line = ""
            line += w + " "
        lines.append(line)
        for k, text in enumerate(lines[:4]):
            draw.text((4, y + 8 + 14 * k), text, fill="black")
        for c, name in enumerate(columns):
            im = Image.fromarray(samples[name][i]).resize((tile, tile), Image.NEAREST)
            sheet.paste(im, (label_w + c * tile, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
