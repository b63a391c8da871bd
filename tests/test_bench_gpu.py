"""bench/gpu.py runs end to end (on the CPU here, with the tiny-sized random checkpoint)."""
from __future__ import annotations

import re
import subprocess
import sys

from core.settings import REPO_ROOT


def test_gpu_bench_prints_a_result_line_per_batch_size(random_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--arch", str(random_checkpoint), "--batch", "1,3", "--repeats", "1",
         "--device", "cpu"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT variant=eager batch=")]
    assert [re.search(r" batch=(\d+)", line).group(1) for line in lines] == ["1", "3"]
    assert "RESULT variant=eager best_batch=" in result.stdout
    for line in lines:
        fields = dict(pair.split("=") for pair in line.split()[1:])
        assert float(fields["s_per_image"]) > 0 and float(fields["unet_s"]) > 0


def test_sd15_shaped_components_have_instaflow_0_9b_sizes():
    import torch

    from bench.gpu import sd15_shaped_components

    parts = sd15_shaped_components(torch.device("cpu"), torch.float32)
    unet_params = sum(p.numel() for p in parts.unet.parameters())
    assert 850e6 < unet_params < 870e6  # SD 1.5's UNet: 859.5M parameters
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size == 768
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8
