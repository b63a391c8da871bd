"""``instabatch`` end to end on the embedded defaults (SQLite ledger, SQLite broker, local objects):
the command runs as a real process and starts a real Celery worker process."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cli.main import app
from core.provenance import read_png_provenance
from core.settings import REPO_ROOT

PROMPTS = [("sku-1", "a red mug on white", 11), ("sku-2", "a blue cup, studio light", 12),
           ("sku-3", "a green vase", 13), ("sku-4", "a black lamp", 14), ("sku-5", "a grey chair", 15)]


def write_csv(path: Path, rows=PROMPTS, header="external_id,prompt,seed") -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header.split(","))
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
    return path


@pytest.fixture
def embedded_env(tmp_path, random_checkpoint) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if name not in ("DATABASE_URL", "BROKER_URL", "S3_BUCKET", "S3_ENDPOINT_URL")}
    env.update(INSTABATCH_VAR_DIR=str(tmp_path / "var"), INSTABATCH_MODEL=str(random_checkpoint),
               INSTABATCH_MICRO_BATCH="4", INSTABATCH_CHUNK_IMAGES="4", INSTABATCH_TORCH_THREADS="1")
    return env


def instabatch(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def audit_count(env: dict[str, str], action: str) -> int:
    engine = create_engine(f"sqlite:///{env['INSTABATCH_VAR_DIR']}/instabatch.db")
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM audit_events WHERE action = :a"), {"a": action}).scalar()
    engine.dispose()
    return count


def pixels(path: Path) -> np.ndarray:
    with PILImage.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_run_writes_one_png_per_prompt_and_a_second_run_gives_the_same_sha256(tmp_path, embedded_env):
    prompts = write_csv(tmp_path / "prompts.csv")
    first = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "out"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "RESULT items=5 succeeded=5 images=5 generated=5" in first.stdout

    rows = read_results(tmp_path / "out")
    assert [row["external_id"] for row in rows] == [external_id for external_id, _, _ in PROMPTS]
    assert {row["state"] for row in rows} == {"succeeded"}
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == len(PROMPTS)
    for row, (_, prompt, seed) in zip(rows, PROMPTS):
        data = (tmp_path / "out" / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        chunks = read_png_provenance(data)
        assert (chunks["prompt"], int(chunks["seed"]), chunks["item_id"]) == (prompt, seed, row["item_id"])
        assert row["qc_verdict"] in ("pass", "review", "reject")

    again = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed" in again.stdout and "generated=0" in again.stdout
    assert [row["sha256"] for row in read_results(tmp_path / "again")] == [row["sha256"] for row in rows]
    assert audit_count(embedded_env, "item.generated") == len(PROMPTS)

    # A new batch of the same prompts and seeds draws the same pixels (its ids differ, in the PNG's text).
    fresh = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "fresh"), "--fresh")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    fresh_rows = read_results(tmp_path / "fresh")
    assert {row["item_id"] for row in fresh_rows}.isdisjoint(row["item_id"] for row in rows)
    for old, new in zip(rows, fresh_rows):
        assert np.array_equal(pixels(tmp_path / "out" / old["image_path"]),
                              pixels(tmp_path / "fresh" / new["image_path"]))
        assert old["pixels_sha256"] == new["pixels_sha256"] and old["sha256"] != new["sha256"]
    assert (tmp_path / "fresh" / "contact-sheet.png").stat().st_size > 0


def test_run_reads_jsonl_with_several_images_per_prompt_and_fails_when_an_item_fails(tmp_path, embedded_env):
    pytest.importorskip("qc.screening")
    lines = [{"prompt": "a red mug", "external_id": "mug", "seed": 5, "num_images": 3},
             {"prompt": "a gore poster", "external_id": "blocked", "seed": 6}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "out"), "--width", "64",
                        "--height", "64")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = read_results(tmp_path / "out")
    mug = [row for row in rows if row["external_id"] == "mug"]
    assert [row["seed"] for row in mug] == ["5", "6", "7"] and {row["state"] for row in mug} == {"succeeded"}
    assert len({row["sha256"] for row in mug}) == 3
    blocked = [row for row in rows if row["external_id"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["state"] == "failed" and "blocked" in blocked[0]["error"]
    assert blocked[0]["image_path"] == "" and blocked[0]["sha256"] == ""


@pytest.mark.parametrize("content, message", [
    ("external_id,seed\nsku-1,4\n", "prompt"),
    ("prompt,seed\na mug,minus one\n", "seed"),
    ("prompt\n" + "x" * 100_000 + "\n", "characters"),
])
def test_run_refuses_a_bad_file_before_submitting_anything(tmp_path, embedded_env, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    result = instabatch(embedded_env, "run", str(bad), "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert message in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cli_env(configure, tmp_path):
    configure()  # the embedded defaults under tmp_path/var
    return CliRunner()


def test_keys_create_list_and_revoke(cli_env: CliRunner):
    from core import keys
    from core.db import session_scope

    created = cli_env.invoke(app, ["keys", "create", "--role", "submitter", "--team", "mkt", "--name", "spring"])
    assert created.exit_code == 0, created.output
    plaintext = created.output.strip().splitlines()[-1]
    with session_scope() as session:
        key = keys.lookup(session, plaintext)
        assert key is not None and (key.role, key.team, key.name) == ("submitter", "mkt", "spring")
        key_id = key.id
    listed = cli_env.invoke(app, ["keys", "list"])
    assert key_id in listed.output and plaintext not in listed.output
    revoked = cli_env.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0, revoked.output
    with session_scope() as session:
        assert keys.lookup(session, plaintext) is None  # a revoked key authenticates nobody
        assert keys.find_key(session, key_id).revoked_at is not None
    assert cli_env.invoke(app, ["keys", "revoke", "ib_nosuchkey"]).exit_code == 1
    bad_role = cli_env.invoke(app, ["keys", "create", "--role", "emperor", "--team", "mkt", "--name", "x"])
    assert bad_role.exit_code == 2 and "unknown role" in bad_role.output


def test_db_upgrade_migrates_the_configured_database(cli_env: CliRunner, tmp_path):
    from core.settings import get_settings

    result = cli_env.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    engine = create_engine(get_settings().database_url)
    with engine.connect() as conn:
        tables = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
    engine.dispose()
    assert {"batches", "items", "images", "audit_events", "outbox"} <= tables


def test_run_survives_a_prompt_that_kills_its_worker(tmp_path, embedded_env):
    """The worker process dies on one prompt (os._exit); run requeues what it held, restarts it, and
    after the attempt cap that prompt is dead while its chunk neighbours succeed."""
    from tests.worker_fault_app import CRASH_MARKER

    rows = [("ok-1", "a red mug", 1), ("boom", f"a {CRASH_MARKER} vase", 2), ("ok-2", "a blue cup", 3)]
    prompts = write_csv(tmp_path / "prompts.csv", rows)
    result = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "out"),
                        "--worker-app", "tests.worker_fault_app", "--timeout", "400", timeout=500)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("worker exited") == 3
    states = {row["external_id"]: row for row in read_results(tmp_path / "out")}
    assert states["boom"]["state"] == "dead" and "dead after 3 attempts" in states["boom"]["error"]
    assert states["ok-1"]["state"] == states["ok-2"]["state"] == "succeeded"


def test_run_recovers_a_chunk_whose_worker_died_before_claiming_it(tmp_path, embedded_env):
    """The embedded broker never redelivers a message its dead worker had taken: run re-chunks the
    batch's queued items when it restarts the worker, so nothing waits forever."""
    rows = [("a", "a red mug", 1), ("b", "a blue cup", 2)]
    prompts = write_csv(tmp_path / "prompts.csv", rows)
    env = {**embedded_env, "DIE_BEFORE_CLAIM": str(tmp_path / "died-once")}
    result = instabatch(env, "run", str(prompts), "--out", str(tmp_path / "out"),
                        "--worker-app", "tests.worker_fault_app", "--timeout", "200", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "died-once").exists() and result.stdout.count("worker exited") == 1
    assert {row["state"] for row in read_results(tmp_path / "out")} == {"succeeded"}


def test_qc_rejudge_and_calibrate_read_the_ledger(cli_env: CliRunner):
    from core import ledger
    from core.db import session_scope
    from core.migrate import upgrade

    upgrade()
    with session_scope() as session:
        batch, _ = ledger.submit_batch(session, ledger.BatchSpec(name="b", items=[ledger.ItemSpec("a red mug")]),
                                       team="t", actor="test")
    rejudged = cli_env.invoke(app, ["qc", "rejudge", batch.id, "--dry-run"])
    assert rejudged.exit_code == 0, rejudged.output
    assert json.loads(rejudged.output)["batch_id"] == batch.id
    calibrated = cli_env.invoke(app, ["qc", "calibrate", batch.id])
    assert calibrated.exit_code == 0, calibrated.output
    missing = cli_env.invoke(app, ["qc", "rejudge", "no-such-batch"])
    assert missing.exit_code == 2 and "no-such-batch" in missing.output


def test_run_refuses_refine_options_out_of_range_before_submitting(tmp_path, embedded_env):
    prompts = write_csv(tmp_path / "prompts.csv", [("a", "a red mug", 1)])
    result = instabatch(embedded_env, "run", str(prompts), "--out", str(tmp_path / "out"), "--refine-strength", "1.5")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "strength" in result.stdout
    assert not (tmp_path / "out").exists()
