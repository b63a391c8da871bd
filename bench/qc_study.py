"""The figures behind the QC defaults (docs/qc.md): ``python -m bench.qc_study STUDY`` (one torch thread).

* ``renders``: metric distributions on tiny-model renders and on the same renders
  blurred, darkened, brightened: how the thresholds separate good from bad.
* ``blur``: share flagged ``blurry`` per candidate threshold, renders blurred by sigma
  against the tiny model's own outputs (the ``batch`` images).
* ``duplicates``: Hamming distances of pairs that are copies (JPEG, noise) and pairs
  that are not (jitter, colour variants, random; the batch's pairs by attributes).
* ``alignment``: held-out renders prompted with their own caption and with the
  colour or the kind swapped: what the attribute judge lets through and catches.
* ``judge``: how often the judge misreads renders whose truth is known, sharp and
  softened like the model's outputs, per attribute and per confidence.
* ``batch --n 500``: generate held-out prompts with the tiny model (or reuse
  ``--out``'s .npz), QC them as the worker would (32-image chunks, known hashes
  across chunks) and report verdicts, reasons, advisories, the rejects explained,
  and a JSONL of outcomes for ``calibrate``, ``policy`` and ``sheet``.
* ``policy``: the stored batch re-judged with each calibrated choice undone.
* ``products``: ``examples/products.csv`` (the demo's prompts and seeds), the same way.
* ``sheet``: a contact sheet of flagged images per reason, labelled with why.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from qc.checker import QualityChecker
from qc.calibration import calibrate
from qc.phash import hamming, phash
from qc.policy import ATTRIBUTE_REASONS, CONFIDENT, rejudge
from qc.settings import QcSettings

METRICS = (
    "sharpness.laplacian_ratio", "sharpness.laplacian_var", "contrast.rms_contrast", "blank.entropy_bits",
    "exposure.luma_mean", "black.luma_p99", "duplicate.nearest_distance", "attribute_alignment.score",
)


def _renders(count: int, seed: int) -> list:
    from instaflow.tiny.prompts import TRAIN_COMBOS, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(seed)
    return [render(random_attributes(rng, TRAIN_COMBOS), rng) for _ in range(count)]


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).astype(np.uint8))


def _report(label: str, outcomes: list) -> None:
    report = calibrate([o.to_dict() if hasattr(o, "to_dict") else o for o in outcomes])
    print(f"== {label}: {report['verdicts']} reasons {report['reasons']}")
    for name in METRICS:
        stats = report["metrics"].get(name)
        if stats:
            print(f"   {name:28s} " + " ".join(f"{k}={stats[k]:.4g}" for k in ("min", "p1", "p5", "p50", "p95", "max")))


def study_renders(count: int) -> None:
    checker = QualityChecker(QcSettings(alignment="none"))
    renders = _renders(count, seed=11)
    variants = {
        "renders": renders,
        "blur sigma=1 (64 px)": [r.filter(ImageFilter.GaussianBlur(1)) for r in renders],
        "blur sigma=2 (64 px)": [r.filter(ImageFilter.GaussianBlur(2)) for r in renders],
        "darkened x0.25": [_scaled(r, 0.25) for r in renders],
        "brightened x1.6": [_scaled(r, 1.6) for r in renders],
    }
    for label, images in variants.items():
        # one image per chunk: duplicates among random renders are the other study's business
        _report(label, [checker.check([image])[0] for image in images])


def _jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


DUPLICATE_CANDIDATES = ((4, 8), (3, 6), (2, 4), (1, 2))  # (luma bits, bits per colour channel)


def _render_pairs(count: int) -> dict[str, list[tuple[int, int]]]:
    """Hamming distances of render pairs that are copies (JPEG, noise) and that are not."""
    from instaflow.tiny.prompts import (
        COLOURS,
        TRAIN_COMBOS,
        Attributes,
        random_attributes,
    )
    from instaflow.tiny.render import render

    rng = np.random.default_rng(1)
    colours = list(COLOURS)
    pairs: dict[str, list[tuple[int, int]]] = {}
    for _ in range(count):
        attrs = random_attributes(rng, TRAIN_COMBOS)
        image = render(attrs, rng)
        other_colour = colours[(colours.index(attrs.colour) + 1 + rng.integers(len(colours) - 1)) % len(colours)]
        others = {
            "render, JPEG q85 copy": _jpeg(image),
            "render + noise 6/255": _noisy(np.asarray(image), rng),
            "render, new jitter": render(attrs, rng),
            "render, other colour": render(Attributes(attrs.kind, other_colour, *attrs.combo[2:], attrs.placement,
                                                      attrs.size), rng),
            "random renders": render(random_attributes(rng, TRAIN_COMBOS), rng),
        }
        value = phash(image)
        for label, other in others.items():
            pairs.setdefault(label, []).append(hamming(value, phash(other)))
    return pairs


def _noisy(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))


def _model_pairs(batch: Path) -> dict[str, list[tuple[int, int]]]:
    """The held-out batch: copies of its images, and every pair of its images by whether the two
    prompts asked for the same product, colour and backdrop (a one-step model varies little by seed)."""
    from instaflow.tiny.prompts import parse_prompt

    images, prompts, _, _ = _load_batch(batch)
    rng = np.random.default_rng(2)
    hashes = [phash(Image.fromarray(image)) for image in images]
    pairs: dict[str, list[tuple[int, int]]] = {
        "model, JPEG q85 copy": [hamming(h, phash(_jpeg(Image.fromarray(im)))) for h, im in zip(hashes, images)],
        "model + noise 6/255": [hamming(h, phash(_noisy(im, rng))) for h, im in zip(hashes, images)],
        "model, same attributes": [], "model, other attributes": [],
    }
    combos = [tuple((parse_prompt(p) or {}).get(k) for k in ("kind", "colour", "backdrop")) for p in prompts]
    for i in range(len(hashes)):
        for j in range(i):
            same = "same" if combos[i] == combos[j] else "other"
            pairs[f"model, {same} attributes"].append(hamming(hashes[i], hashes[j]))
    return pairs


def study_duplicates(count: int, batch: Path) -> None:
    pairs = _render_pairs(count)
    if batch.with_suffix(".npz").exists():
        pairs.update(_model_pairs(batch))
    print("== pairs: luma bits p5/p50/p95, share flagged at (luma, colour) thresholds")
    for label, distances in pairs.items():
        d = np.array(distances)
        flagged = [((d[:, 0] <= luma) & (d[:, 1] <= colour)) for luma, colour in DUPLICATE_CANDIDATES]
        shares = " ".join(f"{t}:{f.mean():.2%} ({f.sum()})" for t, f in zip(DUPLICATE_CANDIDATES, flagged))
        print(f"   {label:24s} n={len(d)} luma={np.percentile(d[:, 0], [5, 50, 95]).tolist()} {shares}")


def study_alignment(count: int) -> None:
    """Held-out renders prompted with their own caption, and with one attribute swapped."""
    from instaflow.tiny.prompts import (
        COLOURS,
        HELD_OUT_COMBOS,
        KINDS,
        Attributes,
        make_caption,
        random_attributes,
    )
    from instaflow.tiny.render import render

    rng = np.random.default_rng(5)
    checker = QualityChecker(QcSettings(alignment="judge"))
    print(f"   skipped: {checker.unavailable()}")
    cases: dict[str, list[tuple[Image.Image, str]]] = {"own caption": [], "soft render, own caption": [],
                                                      "colour swapped": [], "kind swapped": []}
    for _ in range(count):
        attrs = random_attributes(rng, HELD_OUT_COMBOS)
        image = render(attrs, rng)
        caption = make_caption(attrs, rng, say_placement=False, say_size=False)
        colour = [c for c in COLOURS if c != attrs.colour][rng.integers(len(COLOURS) - 1)]
        kind = [k for k in KINDS if k != attrs.kind][rng.integers(len(KINDS) - 1)]
        swap = lambda **change: make_caption(Attributes(**{**attrs.as_dict(), **change}), rng, False, False)
        cases["own caption"].append((image, caption))
        cases["soft render, own caption"].append((image.filter(ImageFilter.GaussianBlur(0.7)), caption))
        cases["colour swapped"].append((image, swap(colour=colour)))
        cases["kind swapped"].append((image, swap(kind=kind)))
    for label, pairs in cases.items():
        outcomes = [checker.check([image], [prompt])[0] for image, prompt in pairs]
        reasons = Counter(r for o in outcomes for r in o.reasons)
        scores = [o.result("attribute_alignment").metrics["score"] for o in outcomes if o.result("attribute_alignment")]
        print(f"== {label}: {dict(Counter(o.verdict for o in outcomes))} reasons {dict(reasons)}"
              f" score p5/p50/p95={np.percentile(scores, [5, 50, 95]).round(3).tolist()}")


def _mismatch_rates(judge, images: np.ndarray, truth: list) -> dict[str, dict[str, float]]:
    """Per attribute: accuracy, and how often the judge names another value with p >= t (a false flag)."""
    predictions = judge.predict(images)
    table = {}
    for attr in ("kind", "colour", "backdrop", "placement", "size"):
        wrong = [(p[attr]["label"] != getattr(t, attr), p[attr]["prob"]) for p, t in zip(predictions, truth)]
        table[attr] = {"accuracy": 1 - float(np.mean([w for w, _ in wrong]))}
        for t in JUDGE_CONFIDENCES:
            table[attr][f"wrong_p>={t}"] = float(np.mean([w and prob >= t for w, prob in wrong]))
    return table


JUDGE_CONFIDENCES = (0.5, 0.9, 0.95, 0.99)


def study_judge(count: int, model: str) -> None:
    """How often the judge is wrong on renders whose truth is known, sharp and softened like the
    model's outputs (Gaussian blur; the model's own VAE decoding them): the rate at which a correct
    image would be flagged, per attribute and per confidence of the judge."""
    from instaflow.tiny.evaluate import vae_reconstruct
    from instaflow.tiny.judge import AttributeJudge
    from instaflow.tiny.prompts import HELD_OUT_COMBOS, TRAIN_COMBOS, random_attributes
    from instaflow.tiny.render import render

    judge = AttributeJudge.load()
    rng = np.random.default_rng(21)
    print(f"== judge on {count} renders per set: accuracy, and share read as another value with p >= t")
    for combos_label, combos in (("held-out", HELD_OUT_COMBOS), ("training", TRAIN_COMBOS)):
        truth = [random_attributes(rng, combos) for _ in range(count)]
        renders = [render(attrs, rng) for attrs in truth]
        sharp = np.stack([np.asarray(r) for r in renders])
        soft = np.stack([np.asarray(r.filter(ImageFilter.GaussianBlur(0.7))) for r in renders])
        variants = {"renders": sharp, "blur 0.7": soft,
                    "blur 1.0": np.stack([np.asarray(r.filter(ImageFilter.GaussianBlur(1.0))) for r in renders]),
                    "VAE round trip": vae_reconstruct(Path(model), sharp),
                    "VAE + blur 0.7": vae_reconstruct(Path(model), soft)}
        for label, images in variants.items():
            for attr, row in _mismatch_rates(judge, images, truth).items():
                print(f"   {combos_label:8s} {label:15s} {attr:9s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))


BLUR_SIGMAS = (0.7, 1.0, 1.5, 2.0)
SHARPNESS_CANDIDATES = (0.0001, 0.00015, 0.0002, 0.0003, 0.0004)


def study_blur(count: int, batch: Path) -> None:
    """Share flagged ``blurry`` per candidate ``sharpness_min``: renders blurred by sigma (64-px units)
    against the tiny model's own outputs (the held-out batch from ``batch``)."""
    checker = QualityChecker(QcSettings(alignment="none"))

    def ratio(images: list) -> np.ndarray:
        return np.array([checker.check([im])[0].result("sharpness").metrics["laplacian_ratio"] for im in images])

    renders = _renders(count, seed=11)
    sets = {"renders": ratio(renders)}
    for sigma in BLUR_SIGMAS:
        sets[f"blur {sigma}"] = ratio([r.filter(ImageFilter.GaussianBlur(sigma)) for r in renders])
    if batch.with_suffix(".npz").exists():
        sets["model outputs"] = ratio([Image.fromarray(im) for im in _load_batch(batch)[0]])
    print("== share flagged blurry at sharpness_min; laplacian_ratio p1 / p5 / p50")
    for label, values in sets.items():
        shares = " ".join(f"{t:g}:{(values < t).mean():.1%}" for t in SHARPNESS_CANDIDATES)
        print(f"   {label:14s} {shares}  p1/p5/p50={np.percentile(values, [1, 5, 50]).round(5).tolist()}")


def held_out_batch_prompts(count: int) -> list[str]:
    """``count`` prompts over the held-out combinations, half naming placement and size."""
    from instaflow.tiny.prompts import HELD_OUT_COMBOS, held_out_prompts

    per_combo = -(-count // len(HELD_OUT_COMBOS))
    return [p for p, _ in held_out_prompts(n_per_combo=per_combo)][:count]


def generate(model: str, prompts: list[str], seeds: list[int], chunk: int = 32) -> tuple[np.ndarray, list[bool], float]:
    """uint8 (N, 64, 64, 3) images as the worker sees them (PIL), their nsfw flags, seconds."""
    from instaflow.pipeline import InstaFlowPipeline

    pipe = InstaFlowPipeline.from_pretrained(model, device="cpu")
    images, flags, seconds = [], [], 0.0
    for start in range(0, len(prompts), chunk):
        began = time.perf_counter()
        output = pipe(prompts[start : start + chunk], seeds=seeds[start : start + chunk], output_type="pil")
        seconds += time.perf_counter() - began
        images += [np.asarray(image.convert("RGB")) for image in output.images]
        flags += list(output.nsfw_flags)
    return np.stack(images), flags, seconds


def check_like_worker(images: np.ndarray, prompts: list[str], flags: list[bool], settings: QcSettings,
                      chunk: int = 32) -> tuple[list[dict], float]:
    """QC in 32-image chunks with the batch's earlier hashes known, as the worker runs it."""
    checker = QualityChecker(settings)
    known: dict[int, int] = {}
    rows, seconds = [], 0.0
    for start in range(0, len(prompts), chunk):
        part = [Image.fromarray(image) for image in images[start : start + chunk]]
        began = time.perf_counter()
        outcomes = checker.check(part, prompts[start : start + chunk], nsfw_flags=flags[start : start + chunk],
                                 known_hashes=known)
        seconds += time.perf_counter() - began
        for offset, outcome in enumerate(outcomes):
            if outcome.phash is not None:
                known.setdefault(outcome.phash, start + offset)
            row = {"index": start + offset, "prompt": prompts[start + offset], **outcome.to_dict()}
            duplicate = outcome.result("duplicate")
            if duplicate is not None and duplicate.reasons:  # the twin's index in the batch, not the chunk
                twin = duplicate.metrics.get("twin_ref", start + duplicate.metrics.get("twin_index", -start - 1))
                row["twin"] = twin
            rows.append(row)
    if checker.unavailable():
        print(f"   skipped: {checker.unavailable()}")
    return rows, seconds


def _save_batch(out: Path, images: np.ndarray, prompts: list[str], seeds: list[int], flags: list[bool]) -> None:
    np.savez_compressed(out.with_suffix(".npz"), images=images, prompts=np.array(prompts), seeds=np.array(seeds),
                        nsfw=np.array(flags))


def _load_batch(out: Path) -> tuple[np.ndarray, list[str], list[int], list[bool]]:
    data = np.load(out.with_suffix(".npz"))
    return data["images"], data["prompts"].tolist(), data["seeds"].tolist(), data["nsfw"].tolist()


def named_placement_or_size(prompt: str) -> bool:
    from instaflow.tiny.prompts import parse_prompt

    wanted = parse_prompt(prompt) or {}
    return wanted.get("placement") is not None or wanted.get("size") is not None


def verdict_report(label: str, rows: list[dict], sample: int = 12) -> dict:
    """Verdict shares, reasons, advisories and a sample of the rejects, explained; printed and returned."""
    count = len(rows)
    verdicts = Counter(row["verdict"] for row in rows)
    reasons = Counter(reason for row in rows for reason in row["reasons"])
    advisories = Counter(a for row in rows for a in row.get("advisories", []))
    named = [row for row in rows if named_placement_or_size(row["prompt"])]
    shares = " ".join(f"{v} {verdicts[v]} ({verdicts[v] / count:.1%})" for v in ("pass", "review", "reject"))
    print(f"== {label}: {count} images: {shares}")
    print(f"   reasons {dict(reasons.most_common())}")
    print(f"   advisories {dict(advisories.most_common())}")
    print(f"   review among the {len(named)} prompts naming placement/size: "
          f"{sum(row['verdict'] == 'review' for row in named)}; among the other {count - len(named)}: "
          f"{sum(row['verdict'] == 'review' for row in rows if row not in named)}")
    rejects = [row for row in rows if row["verdict"] == "reject"]
    print(f"   rejects by reasons {dict(Counter(tuple(row['reasons']) for row in rejects).most_common())}")
    for row in rejects[:: max(1, len(rejects) // sample)][:sample]:
        print(f"     #{row['index']} {row['prompt']!r}: " + ", ".join(f"{r} ({explain(row, r)})" for r in row["reasons"]))
    return {"verdicts": dict(verdicts), "reasons": dict(reasons), "advisories": dict(advisories)}


def study_batch(model: str, count: int, out: Path, regenerate: bool = False) -> None:
    """Generate (or reuse) the held-out batch, QC it with today's defaults, report and store rows."""
    prompts = held_out_batch_prompts(count)
    seeds = list(range(len(prompts)))
    cached = out.with_suffix(".npz")
    gen_seconds = None
    if cached.exists() and not regenerate and _load_batch(out)[1] == prompts:
        images, _, seeds, flags = _load_batch(out)
    else:
        images, flags, gen_seconds = generate(model, prompts, seeds)
        _save_batch(out, images, prompts, seeds, flags)
    rows, qc_seconds = check_like_worker(images, prompts, flags, QcSettings(alignment="judge"))
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = verdict_report(f"{len(prompts)} held-out prompts, {model}", rows)
    _report("metrics", rows)
    verdicts = Counter(report["verdicts"])
    print(f"RESULT qc_batch_images={len(rows)} qc_batch_review_fraction={verdicts['review'] / len(rows):.4f}"
          f" qc_batch_reject_fraction={verdicts['reject'] / len(rows):.4f}")
    if gen_seconds is not None:
        print(f"RESULT generate_ms_per_image={1000 * gen_seconds / len(rows):.2f}")
    print(f"RESULT qc_ms_per_image={1000 * qc_seconds / len(rows):.2f}")


def study_products(model: str, csv_path: Path, out: Path) -> None:
    """The demo's prompts (examples/products.csv, its seeds), generated and checked like the held-out batch."""
    import csv

    with csv_path.open(newline="") as handle:
        entries = list(csv.DictReader(handle))
    prompts, seeds = [e["prompt"] for e in entries], [int(e["seed"]) for e in entries]
    images, flags, _ = generate(model, prompts, seeds)
    _save_batch(out, images, prompts, seeds, flags)
    rows, _ = check_like_worker(images, prompts, flags, QcSettings(alignment="judge"))
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    verdict_report(f"{csv_path} ({len(rows)} prompts)", rows)
    for entry, row in zip(entries, rows):
        flagged = [*row["reasons"], *(f"({a})" for a in row.get("advisories", []))]
        print(f"   {entry['external_id']:14s} {row['verdict']:6s} {' '.join(flagged)}")


def policy_variants() -> dict[str, QcSettings]:
    """Today's defaults, and each calibrated choice undone on its own."""
    from qc.settings import DEFAULT_REJECT_REASONS

    base = QcSettings(alignment="judge")
    return {
        "defaults": base,
        "placement/size to review": base.model_copy(update={"advisory_reasons": set()}),
        "no confident rejects": base.model_copy(update={"reject_reasons": {
            r for r in DEFAULT_REJECT_REASONS if not r.endswith(CONFIDENT)}}),
        "attribute_reject_prob 0.95": base.model_copy(update={"attribute_reject_prob": 0.95}),
        "sharpness_min 0.0004": base.model_copy(update={"sharpness_min": 0.0004}),
        "duplicates 4/8 bits": base.model_copy(update={"duplicate_max_distance": 4,
                                                       "duplicate_max_colour_distance": 8}),
    }


def study_policy(out: Path) -> None:
    """The stored batch re-judged under each variant of the policy (no images needed)."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"== {out}: {len(rows)} images re-judged")
    for label, settings in policy_variants().items():
        outcomes = [rejudge(row, settings) for row in rows]
        verdicts = Counter(o.verdict for o in outcomes)
        review = Counter(r for o in outcomes if o.verdict == "review" for r in o.reasons)
        print(f"   {label:28s} pass {verdicts['pass']} review {verdicts['review']} reject {verdicts['reject']}"
              f"  review reasons {dict(review.most_common())}")


def _metrics(row: dict, scorer: str) -> dict:
    return next((r["metrics"] for r in row["results"] if r["scorer"] == scorer), {})


def explain(row: dict, reason: str) -> str:
    """A short label that says why ``row`` got ``reason``: what was asked, what was seen, the figure."""
    attribute = {v: k for k, v in ATTRIBUTE_REASONS.items() if k != "color"}.get(reason.removesuffix(CONFIDENT))
    if attribute:
        graded = _metrics(row, "attribute_alignment").get("attributes", {}).get(attribute, {})
        return f"{graded.get('wanted')}>{graded.get('seen')} {graded.get('p_seen', 0):.2f}"
    if reason == "blurry":
        return f"lap {_metrics(row, 'sharpness').get('laplacian_ratio', 0):.5f}"
    if reason == "near_duplicate":
        dup = _metrics(row, "duplicate")
        return f"~#{row.get('twin')} {dup.get('nearest_distance')}/{dup.get('nearest_colour_distance')}"
    if reason == "misaligned":
        return f"score {_metrics(row, 'attribute_alignment').get('score', 0):.2f}"
    if reason == "unsure_on_dark":  # the least sure of kind and colour
        graded = _metrics(row, "attribute_alignment").get("attributes", {})
        attr = min((a for a in ("kind", "colour") if a in graded), key=lambda a: graded[a]["p_wanted"])
        return f"{graded[attr]['wanted']} {graded[attr]['p_wanted']:.2f}"
    if reason == "low_visibility":
        return f"dE {_metrics(row, 'visibility').get('subject_contrast', 0):.1f}"
    return reason


def flagged_sheet(rows: list[dict], images: np.ndarray, reasons: list[str], per_reason: int = 8,
                  tile_size: int = 96, columns: int = 8) -> Image.Image:
    """One strip per reason: up to ``per_reason`` flagged images (advisories too), each labelled by ``explain``."""
    from qc.contact_sheet import Tile, contact_sheet

    strips = []
    for reason in reasons:
        hits = [row for row in rows if reason in row["reasons"] or reason in row.get("advisories", [])]
        step = max(1, len(hits) // per_reason)  # spread over the batch, not the first chunk only
        tiles = [Tile(Image.fromarray(images[row["index"]]), row["verdict"], f"#{row['index']} {explain(row, reason)}")
                 for row in hits[::step][:per_reason]]
        verdicts = Counter(row["verdict"] for row in hits)
        counts = ", ".join(f"{verdicts[v]} {v}" for v in ("pass", "review", "reject") if verdicts[v])
        strips.append(contact_sheet(tiles, tile_size=tile_size, columns=min(columns, per_reason),
                                    title=f"{reason}: {len(hits)} of {len(rows)} images ({counts}); shown:"))
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (250, 250, 250))
    top = 0
    for strip in strips:
        sheet.paste(strip, (0, top))
        top += strip.height
    return sheet


def study_sheet(out: Path, reasons: list[str], per_reason: int, sheet_path: Path) -> None:
    images = _load_batch(out)[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if not reasons:
        found = Counter(r for row in rows for r in [*row["reasons"], *row.get("advisories", [])])
        reasons = [r for r, _ in found.most_common()]
    sheet = flagged_sheet(rows, images, reasons, per_reason)
    sheet.quantize(256, dither=Image.Dither.NONE).save(sheet_path, optimize=True)  # a docs-sized PNG
    print(f"wrote {sheet_path} ({sheet_path.stat().st_size // 1024} KB): {reasons}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["renders", "duplicates", "alignment", "judge", "blur", "batch", "policy", "products", "sheet"])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--model", default=None, help="tiny model folder (batch)")
    parser.add_argument("--out", type=Path, default=Path("var/qc-batch.jsonl"))
    parser.add_argument("--regenerate", action="store_true", help="batch: generate again even if --out's .npz matches")
    parser.add_argument("--reasons", nargs="*", default=[], help="sheet: reasons to show (default: all found)")
    parser.add_argument("--per-reason", type=int, default=8, help="sheet: images per reason")
    parser.add_argument("--sheet", type=Path, default=Path("var/qc-flagged.png"), help="sheet: where to write it")
    parser.add_argument("--csv", type=Path, default=Path("examples/products.csv"), help="products: the prompts and seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.study == "renders":
        study_renders(args.n)
    elif args.study == "duplicates":
        study_duplicates(args.n, args.out)
    elif args.study == "alignment":
        study_alignment(args.n)
    elif args.study == "judge":
        from instaflow.tiny import DEFAULT_MODEL_DIR

        study_judge(args.n, args.model or str(DEFAULT_MODEL_DIR))
    elif args.study == "blur":
        study_blur(args.n, args.out)
    elif args.study == "policy":
        study_policy(args.out)
    elif args.study == "products":
        from instaflow.tiny import DEFAULT_MODEL_DIR

        study_products(args.model or str(DEFAULT_MODEL_DIR), args.csv, args.out)
    elif args.study == "sheet":
        study_sheet(args.out, args.reasons, args.per_reason, args.sheet)
    else:
        from instaflow.tiny import DEFAULT_MODEL_DIR

        args.out.parent.mkdir(parents=True, exist_ok=True)
        study_batch(args.model or str(DEFAULT_MODEL_DIR), args.n, args.out, args.regenerate)


if __name__ == "__main__":
    main()
