"""``make demo``'s command on the model that ships in the repository: one PNG per prompt of
examples/products.csv, a results.csv whose sha256 values match the files, the same values again
on a second run. Skipped until the tiny model's weights are committed."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys

import c2pa
import pytest

from core.settings import REPO_ROOT, TINY_MODEL_DIR

pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "model_index.json").is_file(),
                                reason="the tiny model's weights are not in instaflow/weights yet")


def run_demo(env, out) -> list[dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "cli.main", "run", str(REPO_ROOT / "examples" / "products.csv"),
                             "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_demo_writes_one_png_per_prompt_and_the_same_bytes_twice(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("DATABASE_URL", "BROKER_URL", "S3_", "INSTABATCH_"))}
    env["INSTABATCH_VAR_DIR"] = str(tmp_path / "var")
    with open(REPO_ROOT / "examples" / "products.csv", newline="") as handle:
        prompts = list(csv.DictReader(handle))

    rows = run_demo(env, tmp_path / "demo")
    assert len(rows) == len(prompts) and {row["state"] for row in rows} == {"succeeded"}
    assert [row["external_id"] for row in rows] == [p["external_id"] for p in prompts]
    for row in rows:
        data = (tmp_path / "demo" / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        with c2pa.Reader("image/png", io.BytesIO(data)) as reader:  # Content Credentials, as any C2PA tool reads them
            assert reader.get_validation_state() == "Valid" and "trainedAlgorithmicMedia" in reader.json()
    # Signed with the untrusted development chain, made on first use.
    assert (tmp_path / "var" / "credentials" / "signing-key.pem").is_file()
    again = run_demo(env, tmp_path / "again")
    assert [row["sha256"] for row in again] == [row["sha256"] for row in rows]
