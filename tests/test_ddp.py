"""Data parallel training on CPU: 2 gloo processes under torchrun give the single-process result."""

import os
import subprocess
import sys

import torch

from normlab.train import RunDirectory

RUN = [
    "data=digits",
    "model=mlp",
    "model.width=32",
    "epochs=2",
    "batch_size=64",
    "optim.lr=0.05",
    "progress=false",
    "threads=1",
]


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "normlab", "train", *RUN, f"out={tmp_path}", "name=single"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "normlab",
            "train",
            *RUN,
            f"out={tmp_path}",
            "name=ddp",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = RunDirectory(tmp_path / "single")
    b = RunDirectory(tmp_path / "ddp")
    assert b.read_summary()["environment"]["world_size"] == 2
    sa, sb = a.load_checkpoint()["model"], b.load_checkpoint()["model"]
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], atol=2e-5, rtol=1e-4)
    ra, rb = a.read_metrics(), b.read_metrics()
    assert abs(ra[-1]["train_loss"] - rb[-1]["train_loss"]) < 1e-4
    assert ra[-1]["test_acc"] == rb[-1]["test_acc"]
