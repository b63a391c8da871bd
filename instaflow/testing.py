"""Tiny random-weight checkpoints in the published InstaFlow (and SDXL-refiner) diffusers layouts.

Built with the components' own `save_pretrained`, so the real loader reads it exactly as it
reads XCLiu/instaflow_0_9B_from_sd_1_5: model_index.json, unet/, vae/, text_encoder/,
tokenizer/ (vocab.json + merges.txt, written here: nothing is downloaded), scheduler/ and,
optionally, safety_checker/ + feature_extractor/. It draws noise, not products; it exists
to test the engine's mechanics in a second or two on a CPU. The tests and the benchmarks in
``bench/`` build their checkpoints here, so neither depends on the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LATENT_CHANNELS = 4
VAE_BLOCKS = (8, 8, 16, 16)  # four blocks: a VAE scale factor of 8, as in Stable Diffusion
TEXT_WIDTH = 32
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_random_checkpoint(
    path: str | Path,
    image_size: int = 64,
    *,
    with_safety_checker: bool = False,
    class_name: str = "RectifiedFlowPipeline",
    seed: int = 0,
) -> Path:
    """Write a tiny random checkpoint into `path` (created) and return it."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_tokenizer(folder / "tokenizer")
    UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(VAE_BLOCKS) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=image_size,
        scaling_factor=0.18215,
    ).save_pretrained(folder / "vae")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    # Shipped by the published checkpoints; the engine ignores it (rectified flow needs no scheduler).
    PNDMScheduler(skip_prk_steps=True).save_pretrained(folder / "scheduler")
    if with_safety_checker:
        _write_safety_checker(folder, text_config)
    _write_model_index(folder, class_name, with_safety_checker)
    return folder


def write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary: every byte alone and word-final, plus a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in symbols + [symbol + "</w>" for symbol in symbols]:
        vocab[token] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("m", "u"), ("mu", "g</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"model_max_length": MAX_TOKENS, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
              "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return len(vocab)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte if byte in printable else next(extra)) for byte in range(256)]


def _write_safety_checker(folder: Path, text_config: object) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig

    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )


def _write_model_index(folder: Path, class_name: str, with_safety_checker: bool) -> None:
    import diffusers

    index = {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "requires_safety_checker": with_safety_checker,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if with_safety_checker else [None, None],
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if with_safety_checker else [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def make_random_sdxl_refiner(path: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """A tiny random SDXL-Refiner (StableDiffusionXLImg2ImgPipeline) checkpoint in diffusers layout.

    Like stabilityai/stable-diffusion-xl-refiner-1.0: only the second text encoder
    (with projection), aesthetic-score time ids, an Euler epsilon scheduler.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(path)
    torch.manual_seed(seed)
    vocab_size = write_tokenizer(folder / "tokenizer_source")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_source", local_files_only=True)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    time_ids = 5  # original size (2), crop corner (2), aesthetic score (1)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + TEXT_WIDTH,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS, layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, sample_size=image_size, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder, tokenizer=None, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    ).save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / "tokenizer_source")
    return folder
