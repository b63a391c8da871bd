"""Content Credentials on the real libraries: C2PA manifests signed with c2pa-python and read back by
its Reader, the invisible watermark through JPEG re-encoding, the worker's images at 512², and a
worker that will not start without its signing key."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import c2pa
import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from cli.main import app as cli_app
from core import credentials, ledger, watermark
from core.credentials import CredentialsError, SigningIdentity
from core.settings import REPO_ROOT, Settings
from instaflow.testing import make_random_checkpoint
from models import Item
from tests.apikit import ApiHarness
from tests.workerkit import build_stack, running_worker

MANIFEST = credentials.manifest_for(
    title="sku-1-0", software="InstaBatch", version="test", created={"model": "tiny", "weights_sha256": "ab" * 32},
    refined={"refiner_model": "tiny-2rf"}, ledger={"item_id": "item-1", "batch_id": "batch-1", "index": 0})


@pytest.fixture(scope="module")
def dev_chain(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain") / "credentials"
    assert credentials.create_dev_chain(folder)
    assert not credentials.create_dev_chain(folder)  # kept, not replaced
    return folder


@pytest.fixture(scope="module")
def identity(dev_chain) -> SigningIdentity:
    return credentials.identity_from(str(dev_chain / credentials.KEY_FILE), str(dev_chain / credentials.CHAIN_FILE),
                                     source="test")


def product_picture(side: int = 512) -> PILImage.Image:
    """A plain product shot: a coloured box on a two-tone backdrop (the hard case for a watermark)."""
    picture = PILImage.new("RGB", (side, side), (214, 228, 240))
    picture.paste((160, 190, 215), (0, side * 2 // 3, side, side))
    picture.paste((200, 40, 60), (side // 3, side // 3, side * 2 // 3, side * 3 // 4))
    return picture


def encoded(picture: PILImage.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> bytes:
    with PILImage.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_signed_png_webp_and_jpeg_read_as_valid_ai_generated_with_unchanged_pixels(fmt, identity):
    original = encoded(product_picture(128), fmt)
    mime_type = credentials.MIME_TYPES[fmt]
    signed = credentials.sign(original, mime_type, MANIFEST, identity)

    assert decoded(signed) == decoded(original)  # the manifest sits beside the pixels
    with c2pa.Reader(mime_type, io.BytesIO(signed)) as reader:  # the SDK's reader, as any tool reads it
        assert reader.get_validation_state() == "Valid"
        assert "trainedAlgorithmicMedia" in reader.json()
    report = credentials.read_manifest(signed)
    assert report.valid and report.ai_generated and not report.trusted
    assert report.signer == "InstaBatch development signer"
    assert report.ledger == {"item_id": "item-1", "batch_id": "batch-1", "index": 0}
    assert credentials.read_manifest(original).present is False


def test_the_signer_is_trusted_only_against_a_configured_anchor(identity, dev_chain):
    signed = credentials.sign(encoded(product_picture(64), "PNG"), "image/png", MANIFEST, identity)
    assert credentials.read_manifest(signed).state == "Valid"
    anchored = credentials.read_manifest(signed, (dev_chain / credentials.ROOT_FILE).read_bytes())
    assert anchored.state == "Trusted" and anchored.trusted


def tamper_png_pixels(data: bytes) -> bytes:
    """The same PNG with one pixel changed: IDAT re-compressed, its CRC fixed, every other chunk
    (the C2PA manifest's caBX included) left as it was."""
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IDAT":
            raw = bytearray(zlib.decompress(body))
            raw[1] ^= 0xFF  # the first pixel's red value of the first scanline (after its filter byte)
            body = zlib.compress(bytes(raw))
        out += struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))
        position += 12 + length
    return bytes(out)


def test_pixels_changed_after_signing_break_the_hash_binding(identity):
    signed = credentials.sign(encoded(product_picture(64), "PNG"), "image/png", MANIFEST, identity)
    tampered = tamper_png_pixels(signed)
    assert decoded(tampered) != decoded(signed)

    report = credentials.read_manifest(tampered)
    assert report.present and report.state == "Invalid" and not report.valid
    assert "assertion.dataHash.mismatch" in report.failures


def test_the_watermark_survives_jpeg_q75_and_a_resize_and_is_skipped_on_small_images():
    mark_id = watermark.watermark_id("weights", "a red mug", 7)
    marked, mark = watermark.embed(product_picture(512), mark_id)
    assert mark.embedded and watermark.decode(marked) == mark_id
    jpeg = PILImage.open(io.BytesIO(encoded(marked, "JPEG", quality=75)))
    assert watermark.decode(jpeg) == mark_id
    halved = marked.resize((256, 256), PILImage.LANCZOS)
    assert (mark_id, "rescaled") in list(watermark.candidates(halved))  # scaled back to 512 before decoding
    cropped = marked.crop((26, 26, 486, 486))  # 10 %: the block grid moved
    assert (mark_id, "realigned") in list(watermark.candidates(cropped))

    tiny, skipped = watermark.embed(product_picture(64), mark_id)
    assert not skipped.embedded and "64x64" in skipped.reason and tiny.tobytes() == product_picture(64).tobytes()
    assert skipped.as_record()["skipped"] == skipped.reason


@pytest.mark.parametrize("side", [(512, 512), (520, 768), (256, 264)])
def test_the_vectorised_watermark_gives_the_libraries_bytes(side):
    """core/watermark.py embeds all blocks at once; imwatermark's encoder, block by block, must give
    the same pixels (the same prompt, seed and params give the same bytes as before)."""
    from imwatermark import WatermarkEncoder

    rng = np.random.default_rng(sum(side))
    noise = PILImage.fromarray(rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8))
    smooth = noise.resize((side[0] // 8, side[1] // 8)).resize(side, PILImage.BICUBIC)
    white, grey = PILImage.new("RGB", side, (255, 255, 255)), PILImage.new("RGB", side, (90, 90, 90))  # rank 1 / 0 blocks
    for picture in (product_picture(side[0]).resize(side), noise, smooth, PILImage.new("RGB", side), white, grey):
        mark_id = f"{int(rng.integers(0, 2**32)):08x}"
        bgr = np.ascontiguousarray(np.asarray(picture)[:, :, ::-1])
        library = WatermarkEncoder()
        library.set_watermark("bits", watermark._bits(mark_id))
        expected = library.encode(bgr.copy(), watermark.METHOD, scales=list(watermark.SCALES))
        marked, _ = watermark.embed(picture, mark_id)
        assert np.array_equal(np.asarray(marked), expected[:, :, ::-1])


def test_the_numpy_haar_transforms_are_pywavelets_bit_for_bit():
    """The watermark's Haar transforms (core/watermark.py) must give PyWavelets' floats exactly, or a
    pixel near a rounding edge would come out one level off the library's."""
    import pywt

    rng = np.random.default_rng(7)
    for shape in ((512, 512), (260, 388), (2, 6)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        approximation, details = watermark.haar_dwt2(image)
        expected_approximation, expected_details = pywt.dwt2(image, "haar")
        assert np.array_equal(approximation, expected_approximation)
        assert all(np.array_equal(mine, theirs) for mine, theirs in zip(details, expected_details))
        changed = approximation + rng.normal(0, 20, approximation.shape)  # as the embedding changes it
        assert np.array_equal(watermark.haar_idwt2(changed, details), pywt.idwt2((changed, details), "haar"))


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_the_encoder_pool_seals_images_in_threads_or_spawned_processes(dev_chain, tmp_path, pool):
    """worker/sealing.py's ``seal`` (watermark, encode, sign) is the encoder pool's job; in a spawned process
    it must make the same pixels and a manifest a reader finds valid, signed by the same identity."""
    from core.provenance import Encoding
    from worker.pipeline import make_encoder_pool
    from worker.sealing import Sealer, mark_id, seal

    settings = Settings(INSTABATCH_VAR_DIR=str(tmp_path / "var"), C2PA_SIGNING_KEY=str(dev_chain / credentials.KEY_FILE),
                        C2PA_SIGNING_CHAIN=str(dev_chain / credentials.CHAIN_FILE))
    sealer = Sealer(settings)
    records = [{"item_id": f"i{n}", "batch_id": "b", "external_id": None, "prompt": "a mug", "seed": n, "index": 0,
                "model": "tiny", "weights_sha256": "ab" * 32, "params": "{}"} for n in range(2)]
    pictures = [product_picture(256), product_picture(256).transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)]
    pool = make_encoder_pool(pool, 2)
    try:
        sealed = list(pool.map(seal, pictures, [mark_id(record) for record in records], [Encoding("png")] * 2,
                               records, [sealer.signing(record, team=None, submitted_hash="00" * 32)
                                         for record in records]))
    finally:
        pool.shutdown()
    for (data, state), picture, record in zip(sealed, pictures, records):
        report = credentials.read_manifest(data)
        assert report.present and report.state == "Valid" and report.ai_generated
        assert report.ledger["item_id"] == record["item_id"] and report.ledger["watermark"]["embedded"] is True
        assert state["c2pa"]["signer"] == sealer.signers.default.signer
        marked, _ = sealer.mark(picture, record)
        assert PILImage.open(io.BytesIO(data)).convert("RGB").tobytes() == marked.tobytes()
        assert watermark.decode(PILImage.open(io.BytesIO(data))) == mark_id(record)


def test_signatures_are_not_read_back_one_by_one_so_a_load_checks_a_probe_signature(dev_chain, tmp_path):
    """c2pa's verify_after_sign is off (0.56 of a 64² PNG's 0.94 ms); ``check_signing`` signs and reads back once
    per identity, and refuses one whose signatures do not verify (here: a key that is not the chain's)."""
    assert credentials.SIGN_SETTINGS["verify"]["verify_after_sign"] is False
    good = credentials.identity_from(str(dev_chain / credentials.KEY_FILE), str(dev_chain / credentials.CHAIN_FILE),
                                     source="test")
    assert credentials.check_signing(good) is good
    credentials.create_dev_chain(tmp_path / "other")
    wrong_key = SigningIdentity((tmp_path / "other" / credentials.KEY_FILE).read_bytes(), good.chain_pem,
                                signer=good.signer, development=True, source="a mismatched key")
    with pytest.raises(CredentialsError, match="mismatched key"):
        credentials.check_signing(wrong_key)


def test_a_key_that_does_not_match_its_chain_is_refused(dev_chain, tmp_path):
    other = tmp_path / "other"
    credentials.create_dev_chain(other)
    with pytest.raises(CredentialsError, match="does not match"):
        credentials.identity_from(str(other / credentials.KEY_FILE), str(dev_chain / credentials.CHAIN_FILE),
                                  source="test")


def test_a_worker_without_its_signing_key_stops_at_start_and_touches_no_item(configure, random_checkpoint, tmp_path):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint))  # dev mode: it has a chain
    batch_id = stack.submit(["a red mug"], dispatch=False)
    env = {**os.environ, "INSTABATCH_CREDENTIALS": "required"}
    env.pop("C2PA_SIGNING_KEY", None)
    worker = subprocess.run([sys.executable, "-m", "cli.main", "worker"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2
    assert "INSTABATCH_CREDENTIALS=required but no signing key is configured" in worker.stdout
    env.update(C2PA_SIGNING_KEY=str(tmp_path / "missing-key.pem"), C2PA_SIGNING_CHAIN=str(tmp_path / "chain.pem"))
    celery = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert celery.returncode != 0
    assert f"C2PA_SIGNING_KEY / C2PA_SIGNING_CHAIN: {tmp_path / 'missing-key.pem'} does not exist" in celery.stderr
    [item] = stack.items(batch_id)
    assert item.state == "queued" and item.attempts == 0


def test_required_mode_with_a_configured_chain_loads_it(dev_chain, tmp_path):
    settings = Settings(INSTABATCH_VAR_DIR=str(tmp_path), INSTABATCH_CREDENTIALS="required",
                        C2PA_SIGNING_KEY=(dev_chain / credentials.KEY_FILE).read_text(),  # the PEM itself
                        C2PA_SIGNING_CHAIN=str(dev_chain / credentials.CHAIN_FILE))
    signers = credentials.load_signers(settings)
    assert signers.default.development and signers.for_team("any") is signers.default
    assert not (tmp_path / credentials.DEV_FOLDER).exists()  # no development chain made


@pytest.fixture(scope="module")
def checkpoint_512(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("models") / "random-512", image_size=512)


def test_a_worker_image_at_512_reencoded_as_jpeg_q75_without_metadata_is_found_by_its_watermark(
        configure, checkpoint_512, tmp_path):
    """The CLI and ``POST /v1/verify`` find the item of a stripped JPEG copy; the API shows the state."""
    stack = build_stack(configure, INSTABATCH_MODEL=str(checkpoint_512))
    with running_worker(stack):
        batch_id = stack.submit([ledger.ItemSpec(prompt="a red mug", external_id="mug", seed=7),
                                 ledger.ItemSpec(prompt="a red mug", external_id="mug-2", seed=8)],
                                params={"width": 512, "height": 512})
        small_id = stack.submit([ledger.ItemSpec(prompt="a red mug", external_id="tiny", seed=7)],
                                params={"width": 64, "height": 64})
        again_id = stack.submit([ledger.ItemSpec(prompt="a red mug", external_id="again", seed=7)],
                                params={"width": 512, "height": 512})
        for waited in (batch_id, small_id, again_id):
            stack.wait_until_done(waited)
    image = next(i for i in stack.images(batch_id) if i.index == 0 and i.seed == 7)
    stored = stack.store.get(image.storage_key)
    report = credentials.read_manifest(stored)
    assert report.valid and report.ai_generated and report.ledger["item_id"] == image.item_id
    assert report.ledger["batch_submitted_event_hash"] == stack.events(batch_id, "batch.submitted")[0].hash
    assert image.credentials["c2pa"]["signed"] and image.watermark_id == image.credentials["watermark"]["id"]

    copy = tmp_path / "reposted.jpg"
    with PILImage.open(io.BytesIO(stored)) as picture:
        picture.convert("RGB").save(copy, format="JPEG", quality=75)  # no text chunks, no manifest
    assert credentials.read_manifest(copy.read_bytes()).present is False

    result = CliRunner().invoke(cli_app, ["credentials", "verify", "--ledger", str(copy)])
    assert result.exit_code == 0, result.output
    assert "manifest: none" in result.output and f"watermark: {image.watermark_id}" in result.output
    assert f"ledger (watermark): image={image.id} item={image.item_id} external_id=mug" in result.output

    api = ApiHarness.start()
    with open(copy, "rb") as upload:
        answer = api.post("auditor", "/v1/verify", files={"file": ("reposted.jpg", upload, "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["manifest"]["present"] is False and body["watermark"] == {"checked": True, "found": True,
                                                                          "id": image.watermark_id}
    assert {match["image_id"] for match in body["matches"]} >= {image.id}
    assert {match["found_by"] for match in body["matches"]} == {"watermark"}
    signed = api.post("auditor", "/v1/verify", files={"file": ("stored.png", stored, "image/png")}).json()
    assert signed["manifest"]["valid"] and signed["manifest"]["ai_generated"] and not signed["manifest"]["trusted"]
    assert signed["matches"][0]["found_by"] == "sha256" and signed["matches"][0]["same_file"] is True
    other_team = api.post("other_team", "/v1/verify", files={"file": ("reposted.jpg", copy.read_bytes())})
    assert other_team.status_code == 200 and other_team.json()["matches"] == []  # not their team's image
    garbage = api.post("auditor", "/v1/verify", files={"file": ("notes.txt", b"not an image")})
    assert garbage.status_code == 422 and garbage.json()["error"]["code"] == "unreadable_image"
    detail = api.get("auditor", f"/v1/items/{image.item_id}").json()
    assert detail["images"][0]["credentials"] == {
        "signed": True, "format": "image/png", "signer": image.credentials["c2pa"]["signer"],
        "development_chain": True, "watermark": "embedded", "watermark_id": image.watermark_id,
        "watermark_skipped": None}

    # Determinism: the same prompt, seed, params and key give the same pixels and watermark; the
    # signed files differ (the manifest's instance id and time), so they are compared decoded.
    again = stack.images(again_id)[0]
    assert again.watermark_id == image.watermark_id and again.item_id != image.item_id
    assert decoded(stack.store.get(again.storage_key)) == decoded(stored) and again.sha256 != image.sha256

    small = stack.images(small_id)[0]  # 64 px: skipped, and recorded as such
    assert small.watermark_id is None and not small.credentials["watermark"]["embedded"]
    assert "64x64" in small.credentials["watermark"]["skipped"] and small.credentials["c2pa"]["signed"]
    generated = stack.events(small_id, "item.generated")[0].payload["images"][0]
    assert generated["credentials"]["watermark"]["embedded"] is False
    with stack.sessions() as session:
        assert session.get(Item, small.item_id).state == "succeeded"
    small_detail = api.get("auditor", f"/v1/items/{small.item_id}").json()["images"][0]["credentials"]
    assert small_detail["watermark"] == "skipped" and "64x64" in small_detail["watermark_skipped"]


def test_a_team_with_its_own_chain_signs_with_it_and_prompts_appear_only_for_allowed_teams(dev_chain, tmp_path):
    from worker.sealing import Sealer

    credentials.create_dev_chain(tmp_path / "teams" / "mkt")
    settings = Settings(INSTABATCH_VAR_DIR=str(tmp_path / "var"),
                        C2PA_SIGNING_KEY=str(dev_chain / credentials.KEY_FILE),
                        C2PA_SIGNING_CHAIN=str(dev_chain / credentials.CHAIN_FILE),
                        C2PA_TEAM_KEYS_DIR=str(tmp_path / "teams"), C2PA_PROMPT_TEAMS="mkt")
    sealer = Sealer(settings)
    record = {"item_id": "i", "batch_id": "b", "external_id": None, "prompt": "a secret launch product", "seed": 1,
              "index": 0, "model": "tiny", "weights_sha256": "ab" * 32, "params": "{}"}
    picture, mark = sealer.mark(product_picture(64), record)
    png = encoded(picture, "PNG")
    team_file, team_state = sealer.sign(png, "image/png", record, mark, team="mkt", submitted_hash="00" * 32)
    other_file, other_state = sealer.sign(png, "image/png", record, mark, team="ops", submitted_hash=None)

    own_root = (tmp_path / "teams" / "mkt" / credentials.ROOT_FILE).read_bytes()
    assert credentials.read_manifest(team_file, own_root).trusted  # the team's chain signed it
    assert not credentials.read_manifest(other_file, own_root).trusted  # the deployment's chain signed this one
    assert team_state["watermark"]["embedded"] is False and "64x64" in team_state["watermark"]["skipped"]
    with c2pa.Reader("image/png", io.BytesIO(team_file)) as reader:
        assert "a secret launch product" in reader.json()
    with c2pa.Reader("image/png", io.BytesIO(other_file)) as reader:
        assert "a secret launch product" not in reader.json()
