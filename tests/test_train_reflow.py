"""`instabatch train reflow --quick` from the shipped teacher, in a subprocess, on 4 prompts of
examples/products.csv: the one-step model it writes loads in the engine, generates 64x64 images,
and generates through a real Celery worker (PostgreSQL, Redis, S3 over HTTP) whose provenance
names its weights. Rerunning skips the finished stages; an interrupted stage starts again; a bad
teacher is refused with exit 2 and nothing written."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.provenance import read_png_provenance
from core.registry import get_registry
from instaflow.loading import weights_fingerprint
from instaflow.pipeline import InstaFlowPipeline
from instaflow.tiny import WEIGHTS_DIR
from tests.workerkit import Stack, build_stack, running_worker

REPO = Path(__file__).resolve().parents[1]
# The shipped 1-RF teacher once it is committed; until then the 2-RF stands in (the same layout).
TEACHER = next(WEIGHTS_DIR / name for name in ("tiny-teacher", "tiny-2rf")
               if (WEIGHTS_DIR / name / "model_index.json").is_file())
STAGES = ("pairs", "rf2", "rf2_pairs", "distill")
COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")


def train_reflow(out: Path, prompts: Path, *extra: str, teacher: Path = TEACHER) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli.main", "train", "reflow", "--teacher", str(teacher),
               "--prompts", str(prompts), "--out", str(out), "--quick", "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=out.parent)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with (REPO / "examples" / "products.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:4]
    path = tmp_path_factory.mktemp("prompts") / "four.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, prompts_file: Path) -> Path:
    out = tmp_path_factory.mktemp("reflow") / "quick"
    result = train_reflow(out, prompts_file)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_quick_reflow_writes_a_one_step_checkpoint_the_engine_generates_with(quick_run: Path):
    one_step = quick_run / "one-step"
    for part in ("unet", *COPIED):
        assert (one_step / part).is_dir(), part
    for part in COPIED:  # frozen: byte for byte the teacher's
        assert _files(one_step / part) == _files(TEACHER / part), part
    assert _files(one_step / "unet") != _files(TEACHER / "unet")
    assert _files(quick_run / "2rf" / "unet") != _files(one_step / "unet")

    pipe = InstaFlowPipeline.from_pretrained(one_step, device="cpu")
    assert pipe.model_id == "quick-one-step"
    images = pipe(["a red ceramic mug on a white backdrop", "a blue sneaker"], [1, 2],
                  num_inference_steps=1, output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01

    record = json.loads((quick_run / "train.json").read_text())
    assert record["prompts"] == 4 and record["config"]["pairs_per_prompt"] == 2
    assert list(record["stages"]) == list(STAGES)
    assert record["stages"]["pairs"]["n"] == 8
    for stage in ("rf2", "distill"):
        loss = record["stages"][stage]["loss"]
        assert loss["n"] == 8 and np.isfinite([loss["first"], loss["last"]]).all()
    evaluation = record["evaluation"]
    assert evaluation["one_step"]["steps"] == 1 and evaluation["one_step"]["images_per_s"] > 0
    assert evaluation["teacher"]["latent_rmse_to_teacher"] == 0.0
    assert evaluation["one_step"]["pixel_mae_to_teacher"] > 0
    # The PoC comparison of the three (qc/compare.py): the report and its verdict rates per model.
    report = json.loads((quick_run / "compare" / "results.json").read_text())
    assert [row["name"] for row in report["models"]] == ["teacher", "2rf", "one-step"]
    assert evaluation["compare"]["recommendation"] in {"teacher", "2rf", "one-step"}
    assert (quick_run / "compare" / "report.html").is_file()


def test_rerunning_skips_finished_stages_and_an_interrupted_stage_starts_again(quick_run: Path, prompts_file: Path):
    markers = {stage: (quick_run / "stages" / stage / "done.json").stat().st_mtime_ns for stage in STAGES}
    result = train_reflow(quick_run, prompts_file, "--no-eval")
    assert result.returncode == 0, result.stderr
    assert "== stage" not in result.stderr
    for stage in STAGES:
        assert f"stage {stage}: done in an earlier run" in result.stderr
        assert (quick_run / "stages" / stage / "done.json").stat().st_mtime_ns == markers[stage]

    unet_before = _files(quick_run / "one-step" / "unet")
    (quick_run / "stages" / "distill" / "done.json").unlink()  # as a run stopped inside the stage leaves it
    result = train_reflow(quick_run, prompts_file, "--no-eval")
    assert result.returncode == 0, result.stderr
    assert "== stage distill was interrupted in an earlier run: starting it again" in result.stderr
    assert "== stage rf2\n" not in result.stderr and (quick_run / "stages" / "distill" / "done.json").exists()
    assert _files(quick_run / "one-step" / "unet").keys() == unet_before.keys()
    assert "== stage distill" in (quick_run / "train.log").read_text()


def test_a_run_folder_does_not_resume_another_run(quick_run: Path, prompts_file: Path):
    result = train_reflow(quick_run, prompts_file, "--no-eval", "--guidance", "3")
    assert result.returncode == 2
    assert "holds a run started with other settings" in result.stderr and "guidance 2.0 -> 3.0" in result.stderr


@pytest.mark.parametrize("broken", ["missing", "no-index", "no-unet"])
def test_a_bad_teacher_folder_exits_2_and_writes_nothing(tmp_path: Path, prompts_file: Path, broken: str):
    teacher = tmp_path / "teacher"
    if broken != "missing":
        teacher.mkdir()
        for part in COPIED:
            (teacher / part).mkdir()
        if broken == "no-unet":
            (teacher / "model_index.json").write_text("{}")
    out = tmp_path / "out"
    result = train_reflow(out, prompts_file, teacher=teacher)
    assert result.returncode == 2, result.stderr
    expected = {"missing": "is not an existing local folder", "no-index": "has no model_index.json",
                "no-unet": "lacks the component folder(s): unet"}[broken]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.fixture
def one_step_stack(configure, quick_run, pg_url, redis_url, s3_server, s3_bucket) -> Stack:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    return build_stack(configure, INSTABATCH_MODEL=str(quick_run / "one-step"), DATABASE_URL=pg_url,
                       BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)


def test_the_reflowed_one_step_model_generates_through_the_worker(one_step_stack: Stack, quick_run: Path):
    one_step = quick_run / "one-step"
    with running_worker(one_step_stack):
        batch_id = one_step_stack.submit(["a small red ceramic mug on a white backdrop",
                                          "a blue ceramic mug on a beige backdrop"], params={"width": 64, "height": 64})
        counts = one_step_stack.wait_until_done(batch_id)

    assert counts["succeeded"] == 2
    expected_sha = InstaFlowPipeline.from_pretrained(one_step, device="cpu").weights_sha256
    assert expected_sha == weights_fingerprint(one_step) != weights_fingerprint(TEACHER)
    images = one_step_stack.images(batch_id)
    assert len(images) == 2
    # INSTABATCH_MODEL replaces the folder of the registry's default model: the images carry that
    # registry name and the new checkpoint's weights sha256 (docs/models.md, "Registry").
    default_name = get_registry().default
    for image in images:
        assert image.model_id == default_name and image.weights_sha256 == expected_sha
        chunks = read_png_provenance(one_step_stack.store.get(image.storage_key))
        assert chunks["weights_sha256"] == expected_sha and chunks["model"] == default_name


def test_a_compact_teacher_gives_plain_complete_checkpoints(tmp_path: Path, prompts_file: Path):
    """The shipped teachers store their UNet in int8 and link the shared parts (instaflow/compact.py): the
    outputs must be standalone folders (parts copied, not linked) with a standard fp16 UNet."""
    from instaflow.compact import is_compact, write_compact

    teacher = write_compact(WEIGHTS_DIR / "tiny-2rf", tmp_path / "weights" / "compact-teacher",
                            share_from=WEIGHTS_DIR / "tiny-instaflow")
    assert is_compact(teacher / "unet") and (teacher / "vae").is_symlink()
    out = tmp_path / "run"
    result = train_reflow(out, prompts_file, "--no-eval", "--pairs-per-prompt", "1", teacher=teacher)
    assert result.returncode == 0, result.stderr
    for folder in (out / "2rf", out / "one-step"):
        assert not is_compact(folder / "unet") and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        for part in COPIED:
            assert not (folder / part).is_symlink()
            assert _files(folder / part) == _files(teacher / part)
    pipe = InstaFlowPipeline.from_pretrained(out / "one-step", device="cpu")
    assert pipe(["a blue ceramic mug"], [3], output_type="np").images.shape == (1, 64, 64, 3)
