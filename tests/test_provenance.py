"""``instabatch provenance FILE.png``: prints the chunks the worker writes and checks the ledger."""
from __future__ import annotations

import hashlib
import os

import pytest
import typer
from PIL import Image as PILImage
from sqlalchemy import select
from typer.testing import CliRunner

from cli.provenance import provenance
from core import audit, ledger
from core.db import make_engine, session_scope
from core.provenance import encode_png
from models import Image, Item, utcnow
from models.base import new_id
from worker.records import provenance as worker_provenance

PROMPT = "une tasse rouge ☕, product photo"
WEIGHTS = "ab" * 32


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("provenance")(provenance)
    app.command("noop", hidden=True)(lambda: None)
    return app


def run(*args: str):
    return CliRunner().invoke(cli(), ["provenance", *args])


def png_for(item_id: str, batch_id: str, colour=(200, 10, 10), **changes: str) -> bytes:
    record = worker_provenance(item_id=item_id, batch_id=batch_id, external_id="sku-1", prompt=PROMPT, seed=42,
                               index=0, model="tiny-instaflow", weights_sha256=WEIGHTS, params='{"width":16}')
    return encode_png(PILImage.new("RGB", (16, 16), colour), {**record, **changes})


@pytest.fixture
def generated(configure, sqlite_url, tmp_path):
    """A batch of one item and its image row, as the worker leaves them; the PNG on disk."""
    configure(DATABASE_URL=sqlite_url)
    engine = make_engine(sqlite_url)
    spec = ledger.BatchSpec(name="b", items=[ledger.ItemSpec(prompt=PROMPT, external_id="sku-1", seed=42)])
    with session_scope(engine) as session:
        batch, _ = ledger.submit_batch(session, spec, team="mkt", actor="test")
        item_id = session.scalars(select(Item.id).where(Item.batch_id == batch.id)).one()
    data = png_for(item_id, batch.id)
    image_id = new_id()
    with session_scope(engine) as session:
        session.add(Image(id=image_id, item_id=item_id, batch_id=batch.id, index=0, seed=42,
                          storage_key=f"batches/{batch.id}/{item_id}/0.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=16, height=16, model_id="tiny-instaflow", weights_sha256=WEIGHTS, created_at=utcnow()))
        audit.record(session, "item.generated", actor="worker", batch_id=batch.id, item_id=item_id,
                     payload={"seed": 42, "sha256": [hashlib.sha256(data).hexdigest()]})
    path = tmp_path / "image.png"
    path.write_bytes(data)
    engine.dispose()
    return path, image_id, item_id, batch.id


def test_prints_the_chunks_and_confirms_the_ledger(generated):
    path, image_id, item_id, _ = generated
    result = run(str(path))
    assert result.exit_code == 0, result.output
    assert f"  item_id: {item_id}" in result.stdout and f"  prompt: {PROMPT}" in result.stdout
    assert f"  weights_sha256: {WEIGHTS}" in result.stdout and "  seed: 42" in result.stdout
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"RESULT ledger=checked match=true image_id={image_id} sha256={digest}" in result.stdout


def test_a_file_with_other_pixels_fails_the_ledger_check(generated):
    path, _, item_id, batch_id = generated
    path.write_bytes(png_for(item_id, batch_id, colour=(10, 200, 10)))
    result = run(str(path))
    assert result.exit_code == 1
    assert "MISMATCH sha256:" in result.stdout and "match=false" in result.stdout


def test_a_forged_file_registered_in_the_image_row_is_still_caught_by_the_chain(generated):
    path, image_id, item_id, batch_id = generated
    forged = png_for(item_id, batch_id, colour=(0, 0, 0))
    path.write_bytes(forged)
    with session_scope(make_engine(os.environ["DATABASE_URL"])) as session:
        session.get(Image, image_id).sha256 = hashlib.sha256(forged).hexdigest()  # the images table is mutable
    result = run(str(path))
    assert result.exit_code == 1
    assert "MISMATCH sha256: no item.generated audit event" in result.stdout


def test_edited_chunks_are_named(generated):
    path, _, item_id, batch_id = generated
    path.write_bytes(png_for(item_id, batch_id, prompt="a blue mug", seed="7"))
    result = run(str(path))
    assert result.exit_code == 1
    assert "MISMATCH prompt: file has 'a blue mug'" in result.stdout and "MISMATCH seed:" in result.stdout


def test_an_unknown_file_is_not_in_the_ledger(generated, tmp_path):
    stranger = tmp_path / "stranger.png"
    stranger.write_bytes(encode_png(PILImage.new("RGB", (8, 8)), {}))
    result = run(str(stranger))
    assert result.exit_code == 1 and "no InstaBatch provenance chunks" in result.stdout
    assert "MISMATCH no image in the ledger" in result.stdout


def test_without_the_ledger_it_only_prints(generated):
    path, *_ = generated
    result = run(str(path), "--no-ledger")
    assert result.exit_code == 0 and "RESULT ledger=unchecked" in result.stdout


def test_a_file_that_is_no_png_is_refused(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    result = run(str(junk), "--no-ledger")
    assert result.exit_code == 1 and "not a readable PNG" in result.stderr


def test_an_image_from_the_real_worker_checks_out_against_ledger_and_chain(configure, random_checkpoint, tmp_path):
    from core.audit.verify import verify_chain
    from tests.workerkit import build_stack, running_worker

    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint))
    batch_id = stack.submit(["a red ceramic mug", "a blue teapot"])
    with running_worker(stack):
        stack.wait_until_done(batch_id)
    image = stack.images(batch_id)[0]
    path = tmp_path / "downloaded.png"
    path.write_bytes(stack.store.get(image.storage_key))

    result = run(str(path))
    assert result.exit_code == 0, result.output
    assert f"RESULT ledger=checked match=true image_id={image.id}" in result.stdout
    for chunk in ("item_id", "prompt", "seed", "model", "weights_sha256"):
        assert f"  {chunk}: " in result.stdout
    assert stack.store.head(image.storage_key)["weights_sha256"] == image.weights_sha256
    assert verify_chain(make_engine(stack.settings.database_url)).ok
