"""benchmarks/gpu_check.py runs here on CPU (--device cpu --quick), so it is known to work before
a GPU is ever lent: every check passes and the table lists them all."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_passes_on_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "| check | result | status |" in out and " 0 failed" in out
    for part in (
        "SGDG omega 0.1 fast == reference (bfloat16",
        "AdamG omega 0.1 fast == reference (float32",
        "SphereSGD global fast == reference (bfloat16",
        "BatchRenorm2d (r_max 1, d_max 0) == BatchNorm2d",
        "SyncBatchRenorm (1 process) == BatchRenorm2d",
        "precision=bf16 compile=true: riemannian_bn",
        "precision=bf16 compile=true: enorm",
        "precision=bf16 compile=true: sphere_regimes",
        "precision=bf16 compile=true: batch_size",
        "step ratios on wrn16_4",
    ):
        assert part in out, part


def test_gpu_check_without_cuda_says_how_to_run_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run for real")
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "--device cpu --quick" in done.stdout
