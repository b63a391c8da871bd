"""The figures behind the subject-visibility checks (docs/qc.md, "Subject visibility"):
``python -m bench.qc_dark [--n 200]`` (one torch thread).

Per backdrop, ``--n`` images of each set, QC'd as the worker runs it (32-image chunks, the judge):

* renders: correct products (the renderer's ground truth), prompted with their own caption;
* renders through the VAE: the same, encoded and decoded by the tiny model's own VAE (the best a
  generated image can look in that latent space);
* generated: the committed one-step model on captions over every (kind, colour) for that backdrop;
* the demo's dark-grey failures (examples/products.csv: sku-bottle-04, sku-lamp-04, sku-chair-04).

Prints the share flagged ``low_visibility`` and ``unsure_on_dark`` per set and backdrop, the
threshold sweeps they were chosen from, verdicts before and after, QC's cost per image with and
without the visibility scorer, and ``RESULT`` lines; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image

from qc.checker import QualityChecker, build_scorers
from qc.policy import rejudge
from qc.settings import QcSettings

CHUNK = 32
DEMO_FAILURES = ("sku-bottle-04", "sku-lamp-04", "sku-chair-04")
PROB_SWEEP = (0.9, 0.95, 0.97, 0.98, 0.99)
CONTRAST_SWEEP = (6.0, 8.0, 10.0, 12.0, 13.0)


def backdrop_sets(per_backdrop: int, seed: int = 42) -> dict[str, tuple[np.ndarray, list[str]]]:
    """backdrop -> (uint8 renders, their captions), every (kind, colour) of that backdrop."""
    from instaflow.tiny.prompts import BACKDROPS, all_combos, caption_mentions, make_caption, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(seed)
    sets = {}
    for backdrop in BACKDROPS:
        combos = tuple(c for c in all_combos() if c[2] == backdrop)
        pixels, captions = [], []
        for _ in range(per_backdrop):
            attrs = random_attributes(rng, combos)
            pixels.append(np.asarray(render(attrs, rng)))
            captions.append(make_caption(attrs, rng, *caption_mentions(rng, 0.5)))
        sets[backdrop] = (np.stack(pixels), captions)
    return sets


def generate(pipe, prompts: list[str], seed_base: int) -> np.ndarray:
    images = []
    for start in range(0, len(prompts), CHUNK):
        part = prompts[start : start + CHUNK]
        out = pipe(part, seeds=list(range(seed_base + start, seed_base + start + len(part))), output_type="pil")
        images += [np.asarray(image.convert("RGB")) for image in out.images]
    return np.stack(images)


def qc_records(images: np.ndarray, prompts: list[str]) -> list[dict]:
    checker = QualityChecker(QcSettings(alignment="judge"))
    records = []
    for start in range(0, len(prompts), CHUNK):
        part = [Image.fromarray(image) for image in images[start : start + CHUNK]]
        records += [o.to_dict() for o in checker.check(part, prompts[start : start + CHUNK])]
    return records


def metric(record: dict, scorer: str, name: str):
    result = next((r for r in record["results"] if r["scorer"] == scorer), None)
    return None if result is None else result["metrics"].get(name)


def dark_min_prob(record: dict) -> float | None:
    """The judge's lower probability of the requested kind and colour (None: not graded)."""
    attributes = (next((r for r in record["results"] if r["scorer"] == "attribute_alignment"), {})
                  .get("metrics", {}).get("attributes") or {})
    probs = [attributes[a]["p_wanted"] for a in ("kind", "colour") if a in attributes]
    return min(probs) if probs else None


def share(records: list[dict], *reasons: str) -> float:
    """Share of the records with any of ``reasons`` among their (telling) reasons."""
    return float(np.mean([any(reason in record["reasons"] for reason in reasons) for record in records]))


def verdicts(records: list[dict], settings: QcSettings) -> dict[str, int]:
    outcomes = [rejudge(r, settings).verdict for r in records]
    return {v: outcomes.count(v) for v in ("pass", "review", "reject")}


BEFORE = QcSettings(alignment="judge", visibility_min=0.0, dark_attribute_min_prob=0.0)
AFTER = QcSettings(alignment="judge")


def report_set(label: str, by_backdrop: dict[str, list[dict]], dark: str) -> None:
    print(f"== {label}")
    for backdrop, records in by_backdrop.items():
        contrast = np.array([metric(r, "visibility", "subject_contrast") for r in records])
        before, after = verdicts(records, BEFORE), verdicts(records, AFTER)
        print(f"   {backdrop:11s} n={len(records)} low_visibility {share(records, 'low_visibility'):.1%} "
              f"unsure_on_dark {share(records, 'unsure_on_dark'):.1%}  subject_contrast min/p1/p50 "
              f"{contrast.min():.1f}/{np.percentile(contrast, 1):.1f}/{np.median(contrast):.1f}  "
              f"verdicts before {before} after {after}")
    records = by_backdrop[dark]
    probs = np.array([p for p in map(dark_min_prob, records) if p is not None])
    contrast = np.array([metric(r, "visibility", "subject_contrast") for r in records])
    print(f"   {dark}: share of min p(kind, colour) below " +
          " ".join(f"{t:g}: {(probs < t).mean():.1%}" for t in PROB_SWEEP) +
          "; subject_contrast below " + " ".join(f"{t:g}: {(contrast < t).mean():.1%}" for t in CONTRAST_SWEEP))


def demo_failures(pipe, csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["external_id"] in DEMO_FAILURES]
    images = generate_at(pipe, [r["prompt"] for r in rows], [int(r["seed"]) for r in rows])
    records = qc_records(images, [r["prompt"] for r in rows])
    print("== the demo's dark-grey failures (examples/products.csv, their seeds)")
    for row, record in zip(rows, records):
        print(f"   {row['external_id']:14s} {record['verdict']:6s} {record['reasons']} "
              f"subject_contrast {metric(record, 'visibility', 'subject_contrast'):.1f} "
              f"min p(kind, colour) {dark_min_prob(record):.3f}")
    return records


def generate_at(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    out = pipe(prompts, seeds=seeds, output_type="pil")
    return np.stack([np.asarray(image.convert("RGB")) for image in out.images])


def cost(images: np.ndarray, prompts: list[str], repeats: int = 5) -> dict[str, float]:
    """ms per image of the worker's checker with and without the visibility scorer, and of the scorer
    alone: the two checkers alternate, best of ``repeats`` each (the machine is shared)."""
    pictures = [Image.fromarray(image) for image in images]
    settings = QcSettings(alignment="judge")
    full = build_scorers(settings)
    checkers = {"without": QualityChecker(settings, [s for s in full if s.name != "visibility"]),
                "with": QualityChecker(settings, full),
                "visibility_alone": QualityChecker(settings, [s for s in full if s.name == "visibility"])}
    best = dict.fromkeys(checkers, float("inf"))
    for checker in checkers.values():
        checker.check(pictures[:2], prompts[:2])  # load the judge, warm caches
    for _ in range(repeats):
        for label, checker in checkers.items():
            began = time.perf_counter()
            for start in range(0, len(pictures), CHUNK):
                checker.check(pictures[start : start + CHUNK], prompts[start : start + CHUNK])
            best[label] = min(best[label], time.perf_counter() - began)
    return {label: 1000 * seconds / len(pictures) for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="images per backdrop and set")
    parser.add_argument("--csv", type=Path, default=Path("examples/products.csv"))
    parser.add_argument("--cost-only", action="store_true", help="only the ms/image figures (on renders)")
    args = parser.parse_args()
    import torch

    from instaflow.pipeline import InstaFlowPipeline
    from instaflow.tiny import DEFAULT_MODEL_DIR
    from instaflow.tiny.evaluate import vae_reconstruct

    torch.set_num_threads(1)
    dark = "dark grey"
    sets = backdrop_sets(args.n)
    if args.cost_only:
        pixels = np.concatenate([p for p, _ in sets.values()])
        print_cost(cost(pixels, [c for _, captions in sets.values() for c in captions]))
        return
    pipe = InstaFlowPipeline.from_pretrained(DEFAULT_MODEL_DIR, device="cpu")
    renders = {b: qc_records(pixels, captions) for b, (pixels, captions) in sets.items()}
    through_vae = {b: qc_records(vae_reconstruct(DEFAULT_MODEL_DIR, pixels), captions)
                   for b, (pixels, captions) in sets.items()}
    generated_pixels = {b: generate(pipe, captions, 5000 + 1000 * i)
                        for i, (b, (_, captions)) in enumerate(sets.items())}
    generated = {b: qc_records(generated_pixels[b], sets[b][1]) for b in sets}
    report_set("renders (correct products)", renders, dark)
    report_set("renders through the VAE", through_vae, dark)
    report_set("generated (one-step model)", generated, dark)
    failures = demo_failures(pipe, args.csv)
    timing = cost(generated_pixels[dark], sets[dark][1])

    every_render = [r for records in renders.values() for r in records]
    print(f"RESULT qc_dark_demo_failures_flagged={sum(r['verdict'] != 'pass' for r in failures)}/{len(failures)}")
    print(f"RESULT qc_dark_render_low_visibility_fraction={share(every_render, 'low_visibility'):.4f} "
          f"qc_dark_render_dark_unsure_fraction={share(renders[dark], 'unsure_on_dark'):.4f} "
          f"qc_dark_vae_dark_unsure_fraction={share(through_vae[dark], 'unsure_on_dark'):.4f}")
    print(" ".join(["RESULT"] + [f"qc_dark_generated_flag_fraction_{b.replace(' ', '_')}="
                                 f"{share(records, 'unsure_on_dark', 'low_visibility'):.4f}"
                                 for b, records in generated.items()]))
    before, after = verdicts(generated[dark], BEFORE), verdicts(generated[dark], AFTER)
    print(f"RESULT qc_dark_generated_pass_before={before['pass'] / args.n:.4f} "
          f"qc_dark_generated_pass_after={after['pass'] / args.n:.4f}")
    print_cost(timing)


def print_cost(timing: dict[str, float]) -> None:
    print(f"RESULT qc_ms_per_image_without_visibility={timing['without']:.3f} "
          f"qc_ms_per_image_with_visibility={timing['with']:.3f} "
          f"qc_visibility_ms_per_image={timing['visibility_alone']:.3f}")


if __name__ == "__main__":
    main()
