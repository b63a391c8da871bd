"""The one-step rectified-flow engine, through the real loader, on a tiny random checkpoint."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow.loading import ModelNotFoundError, load_components, weights_fingerprint
from instaflow.pipeline import InstaFlowPipeline
from instaflow.testing import make_random_checkpoint

PROMPTS = ["a red mug on a table", "a blue running shoe", "a green glass bottle"]


@pytest.fixture(scope="module")
def pipe(random_checkpoint: Path) -> InstaFlowPipeline:
    torch.set_num_threads(1)
    return InstaFlowPipeline.from_pretrained(random_checkpoint)


@pytest.fixture
def unet_calls(pipe: InstaFlowPipeline, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record every UNet call: its batch size, timesteps and text embeddings."""
    calls: list[dict] = []
    real_forward = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        calls.append({"batch": sample.shape[0], "timesteps": timestep.tolist(), "embeds": encoder_hidden_states})
        return real_forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return calls


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_loads_the_checkpoint_layout_on_cpu_in_fp32(pipe: InstaFlowPipeline, random_checkpoint: Path) -> None:
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.unet.dtype == torch.float32
    assert pipe.native_size == (64, 64)
    assert pipe.model_id == random_checkpoint.name
    assert len(pipe.weights_sha256) == 64 and pipe.weights_sha256 == weights_fingerprint(random_checkpoint)
    assert pipe.safety_checker is None


def test_fingerprint_follows_the_weight_bytes_and_writes_nothing(random_checkpoint: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(random_checkpoint, tmp_path / "copy")
    files_before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert weights_fingerprint(copy) == weights_fingerprint(random_checkpoint)

    changed = shutil.copytree(random_checkpoint, tmp_path / "changed")
    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(changed) != weights_fingerprint(random_checkpoint)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == files_before


def test_a_batch_of_n_prompts_gives_n_images_of_the_asked_size(pipe: InstaFlowPipeline) -> None:
    out = pipe(PROMPTS, seeds=[1, 2, 3])
    assert len(out.images) == 3 and out.nsfw_flags == [False] * 3
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in out.images)

    wide = pipe(PROMPTS[:1], seeds=[1], height=32, width=48, output_type="np")
    assert wide.images.shape == (1, 32, 48, 3)
    assert wide.images.min() >= 0.0 and wide.images.max() <= 1.0


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(pipe: InstaFlowPipeline) -> None:
    first = pipe(PROMPTS, seeds=[7, 8, 9]).images
    again = pipe(PROMPTS, seeds=[7, 8, 9]).images
    assert [png_bytes(image) for image in first] == [png_bytes(image) for image in again]

    other = pipe(PROMPTS, seeds=[70, 80, 90]).images
    for a, b in zip(first, other):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 0


def test_an_images_noise_does_not_depend_on_its_batch(pipe: InstaFlowPipeline) -> None:
    alone = pipe.prepare_noise([8], 64, 64)
    in_batch = pipe.prepare_noise([7, 8, 9], 64, 64)
    assert torch.equal(alone[0], in_batch[1])

    image_alone = pipe(PROMPTS[1:2], seeds=[8], output_type="np").images[0]
    image_in_batch = pipe(PROMPTS, seeds=[7, 8, 9], output_type="np").images[1]
    bitwise = np.array_equal(image_alone, image_in_batch)
    max_diff = float(np.abs(image_alone - image_in_batch).max())
    print(f"RESULT cpu_batch_composition_bitwise_identical={bitwise} max_abs_diff={max_diff:.3g}")
    assert max_diff < 1e-4  # kernels may reorder float sums by batch size, never more than rounding


def test_one_step_calls_the_unet_once_at_timestep_1000(pipe: InstaFlowPipeline, unet_calls: list[dict]) -> None:
    pipe(PROMPTS, seeds=[1, 2, 3])
    assert len(unet_calls) == 1
    assert unet_calls[0]["batch"] == 3 and unet_calls[0]["timesteps"] == [1000.0] * 3


def test_n_steps_call_the_unet_n_times_on_instaflows_timesteps(
    pipe: InstaFlowPipeline, unet_calls: list[dict]
) -> None:
    pipe(PROMPTS[:2], seeds=[1, 2], num_inference_steps=4)
    assert [call["timesteps"] for call in unet_calls] == [[t, t] for t in (1000.0, 750.0, 500.0, 250.0)]


def test_one_step_latent_is_noise_plus_velocity(pipe: InstaFlowPipeline) -> None:
    latents = pipe(PROMPTS[:2], seeds=[3, 4], output_type="latent").images
    noise = pipe.prepare_noise([3, 4], 64, 64)
    with torch.inference_mode():
        embeds = pipe.encode_prompts(PROMPTS[:2])
        velocity = pipe.unet(noise, torch.full((2,), 1000.0), encoder_hidden_states=embeds).sample
    torch.testing.assert_close(latents, noise + velocity, rtol=0, atol=1e-6)


def test_euler_steps_add_dt_times_velocity(pipe: InstaFlowPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    class Constant:
        sample = None

    def constant_velocity(sample, timestep, encoder_hidden_states, **kwargs):
        Constant.sample = torch.full_like(sample, 2.0)
        return Constant

    monkeypatch.setattr(pipe.unet, "forward", constant_velocity)
    latents = pipe(PROMPTS[:1], seeds=[5], num_inference_steps=4, output_type="latent").images
    torch.testing.assert_close(latents, pipe.prepare_noise([5], 64, 64) + 2.0)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_no_guidance_means_one_unet_pass_per_image(
    pipe: InstaFlowPipeline, unet_calls: list[dict], guidance_scale: float
) -> None:
    pipe(PROMPTS, seeds=[1, 2, 3], guidance_scale=guidance_scale)
    assert [call["batch"] for call in unet_calls] == [3]


def test_guidance_doubles_the_batch_with_unconditional_embeddings(
    pipe: InstaFlowPipeline, unet_calls: list[dict]
) -> None:
    pipe(PROMPTS[:2], seeds=[1, 2], guidance_scale=1.5, num_inference_steps=2)
    assert [call["batch"] for call in unet_calls] == [4, 4]
    with torch.inference_mode():
        empty, negative = pipe.encode_prompts(["", ""]), pipe.encode_prompts(["blurry", "blurry"])
    assert torch.equal(unet_calls[0]["embeds"][:2], empty)

    unet_calls.clear()
    pipe(PROMPTS[:2], seeds=[1, 2], guidance_scale=1.5, negative_prompt="blurry")
    assert torch.equal(unet_calls[0]["embeds"][:2], negative)


def test_guided_velocity_mixes_conditional_and_unconditional(pipe: InstaFlowPipeline) -> None:
    seeds, scale = [1, 2], 3.0
    guided = pipe(PROMPTS[:2], seeds=seeds, guidance_scale=scale, output_type="latent").images
    noise = pipe.prepare_noise(seeds, 64, 64)
    with torch.inference_mode():
        steps = torch.full((2,), 1000.0)
        v_c = pipe.unet(noise, steps, encoder_hidden_states=pipe.encode_prompts(PROMPTS[:2])).sample
        v_u = pipe.unet(noise, steps, encoder_hidden_states=pipe.encode_prompts(["", ""])).sample
    torch.testing.assert_close(guided, noise + v_u + scale * (v_c - v_u), rtol=0, atol=1e-5)


def test_negative_prompt_without_guidance_is_refused(pipe: InstaFlowPipeline) -> None:
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        pipe(PROMPTS[:1], seeds=[1], negative_prompt="blurry")


@pytest.mark.parametrize("height, width", [(60, 64), (64, 100), (0, 64)])
def test_sizes_off_the_vae_grid_are_refused(pipe: InstaFlowPipeline, height: int, width: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(PROMPTS[:1], seeds=[1], height=height, width=width)


def test_one_seed_per_prompt_is_required(pipe: InstaFlowPipeline) -> None:
    with pytest.raises(ValueError, match="one seed per prompt"):
        pipe(PROMPTS, seeds=[1])
    with pytest.raises(ValueError, match="seeds must be integers"):
        pipe(PROMPTS[:1], seeds=[-1])


@pytest.mark.parametrize("model", ["XCLiu/instaflow_0_9B_from_sd_1_5", "/nowhere/instaflow"])
def test_a_path_that_is_not_a_local_folder_is_a_clear_error(model: str) -> None:
    with pytest.raises(ModelNotFoundError, match=model) as error:
        InstaFlowPipeline.from_pretrained(model)
    assert isinstance(error.value, ValueError)


def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(random_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_components(tmp_path)
    broken = shutil.copytree(random_checkpoint, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match="unet"):
        load_components(broken)


def test_the_bundled_safety_checker_flags_and_blacks_out(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = make_random_checkpoint(tmp_path_factory.mktemp("models") / "with-checker", with_safety_checker=True)
    pipe = InstaFlowPipeline.from_pretrained(folder)
    assert pipe.safety_checker is not None
    out = pipe(PROMPTS[:2], seeds=[1, 2], output_type="np")
    assert out.nsfw_flags == [False, False] and out.images.max() > 0

    # Thresholds below any cosine similarity: every image counts as flagged.
    with torch.no_grad():
        pipe.safety_checker.concept_embeds_weights.fill_(-2.0)
    flagged = pipe(PROMPTS[:2], seeds=[1, 2], output_type="np")
    assert flagged.nsfw_flags == [True, True] and flagged.images.max() == 0.0


def test_a_fixed_batch_size_makes_an_image_independent_of_its_chunk(pipe: InstaFlowPipeline) -> None:
    prompts = [f"{color} mug" for color in ("red", "blue", "green", "white", "black")]
    seeds = [11, 12, 13, 14, 15]
    full = pipe(prompts, seeds=seeds, output_type="np", fixed_batch_size=4 + 1).images
    partial = pipe(prompts[2:4], seeds=seeds[2:4], output_type="np", fixed_batch_size=5)
    assert partial.images.shape[0] == 2 and len(partial.nsfw_flags) == 2
    assert np.array_equal(full[2], partial.images[0]) and np.array_equal(full[3], partial.images[1])
    with pytest.raises(ValueError, match="fixed_batch_size"):
        pipe(prompts, seeds=seeds, fixed_batch_size=4)


def test_prompts_encoded_ahead_give_the_same_images_and_are_taken_once(pipe: InstaFlowPipeline) -> None:
    prompts, seeds = ["red mug", "blue vase", "green lamp"], [21, 22, 23]
    plain = pipe(prompts, seeds=seeds, output_type="np", fixed_batch_size=4).images
    pipe.encode_ahead(prompts, fixed_batch_size=4)
    encoded = []
    original = pipe._encode_text
    pipe._encode_text = lambda texts: encoded.append(list(texts)) or original(texts)  # spy: encodes done in the pass
    try:
        ahead = pipe(prompts, seeds=seeds, output_type="np", fixed_batch_size=4).images
        again = pipe(prompts, seeds=seeds, output_type="np", fixed_batch_size=4).images
    finally:
        del pipe._encode_text
    assert np.array_equal(plain, ahead) and np.array_equal(plain, again)
    assert encoded == [prompts + prompts[-1:]]  # the first pass took the embeddings encoded ahead; the second encoded
