"""Compact checkpoints (instaflow/compact.py): int8 UNets and shared parts, loaded like any folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from instaflow.compact import INT8_WEIGHTS, dequantize, export_standard, quantize, write_compact
from instaflow.loading import weights_fingerprint
from instaflow.pipeline import InstaFlowPipeline
from instaflow.testing import make_random_checkpoint

PROMPTS = ["a red mug on a white backdrop", "a blue chair on a dark grey backdrop"]


def test_int8_keeps_every_weight_within_half_a_step_of_its_channel():
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(8, 4, 3, 3) * torch.linspace(0.01, 3, 8).reshape(8, 1, 1, 1),
             "conv.bias": torch.randn(8)}
    stored = quantize(state)
    assert stored["conv.weight"].dtype == torch.int8 and stored["conv.bias"].dtype == torch.float16
    back = dequantize(stored, torch.float32)
    step = state["conv.weight"].abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert ((back["conv.weight"] - state["conv.weight"]).abs() <= step / 2 + 1e-7).all()
    assert set(back) == set(state)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A default model and a sibling with other UNet weights but the same VAE, text encoder, tokenizer."""
    root = tmp_path_factory.mktemp("family")
    default = make_random_checkpoint(root / "default", seed=1)
    sibling = make_random_checkpoint(root / "sibling-full", seed=1)
    unet = UNet2DConditionModel.from_pretrained(sibling / "unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.mul_(1.1)
    unet.save_pretrained(sibling / "unet", safe_serialization=True)
    compact = write_compact(sibling, root / "sibling", share_from=default)
    return default, sibling, compact


def test_a_compact_folder_generates_what_its_full_precision_source_does(family):
    _, full, compact = family
    assert (compact / "unet" / INT8_WEIGHTS).is_file() and (compact / "vae").is_symlink()
    expected = InstaFlowPipeline.from_pretrained(full, device="cpu")(PROMPTS, [1, 2], output_type="np").images
    got = InstaFlowPipeline.from_pretrained(compact, device="cpu")(PROMPTS, [1, 2], output_type="np").images
    assert np.abs(got - expected).mean() < 2 / 255
    assert json.loads((compact / "model_index.json").read_text())["_name_or_path"] == "sibling"


def test_the_fingerprint_covers_the_shared_parts_and_differs_from_the_source(family, tmp_path):
    default, full, compact = family
    assert weights_fingerprint(compact) != weights_fingerprint(full)
    copy = export_standard(compact, tmp_path / "exported")
    assert not (copy / "vae").is_symlink() and (copy / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    # The exported folder is a plain diffusers checkpoint: diffusers' own loader reads its UNet.
    UNet2DConditionModel.from_pretrained(copy / "unet", local_files_only=True)
    changed = tmp_path / "changed"
    shutil.copytree(compact, changed)  # the shared parts copied, not linked
    assert weights_fingerprint(changed) == weights_fingerprint(compact)  # same bytes, copied or linked
    other_vae = tmp_path / "other-vae"  # a new folder: fingerprints are cached per folder
    shutil.copytree(compact, other_vae)
    (other_vae / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    assert weights_fingerprint(other_vae) != weights_fingerprint(compact)


def test_parts_that_differ_are_not_shared(family, tmp_path):
    default, _, _ = family
    other = make_random_checkpoint(tmp_path / "other", seed=2)
    with pytest.raises(ValueError, match="cannot be shared"):
        write_compact(other, tmp_path / "out", share_from=default)


def test_rederive_quick_publishes_compact_teacher_and_ablation_sharing_the_default_parts(tmp_path):
    """instaflow/tiny/rederive.py at --quick scale, published into a copy of the shipped weights folder."""
    from core.settings import WEIGHTS_DIR
    from instaflow.tiny.rederive import rederive, publish

    weights = tmp_path / "weights"
    for name in ("tiny-instaflow", "tiny-2rf"):
        shutil.copytree(WEIGHTS_DIR / name, weights / name, symlinks=True)
    summary = rederive(tmp_path / "run", quick=True, log=lambda line: None)
    assert set(summary) == {"shipped_parts", "data", "latents", "teacher", "reflow_pairs", "direct"}
    published = publish(tmp_path / "run", weights)
    assert [p.name for p in published] == ["tiny-teacher", "tiny-direct"]  # the 2-RF is compact already
    for folder in published:
        assert (folder / "unet" / INT8_WEIGHTS).is_file() and (folder / "vae").resolve() == weights / "tiny-instaflow" / "vae"
        images = InstaFlowPipeline.from_pretrained(folder, device="cpu")(PROMPTS, [1, 2], output_type="np").images
        assert images.shape == (2, 64, 64, 3)
