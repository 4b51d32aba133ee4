"""SyncBatchNorm / SyncBatchRenorm: local fallback, and 2 gloo ranks vs one process on the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normlab.nn import BatchRenorm1d, BatchRenorm2d, SyncBatchNorm, SyncBatchRenorm, convert_norm
from normlab.nn.batch_renorm import batch_renorm
from normlab.nn.sync import sync_batch_renorm, world_size

WORLD = 2
TIMEOUT_S = 120.0


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Cases: each builds a layer (and its single-process twin) and the per-step inputs of the whole
# batch. Everything is deterministic from the case's seed, so ranks and the parent agree.
# ----------------------------------------------------------------------------------------------


def _renorm_kwargs():
    return dict(schedule="constant", r_max=1.5, d_max=0.5, momentum=0.3, dtype=torch.float64)


def _paper_kwargs():
    # A compressed paper schedule: BatchNorm at step 0, then the limits open up over two steps.
    return dict(
        warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=1, momentum=0.2, dtype=torch.float64
    )


def _conv_net():
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64),
        nn.BatchNorm2d(4, dtype=torch.float64),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1, dtype=torch.float64),  # output shape = input shape
        BatchRenorm2d(2, **_renorm_kwargs()),
    )


CASES = {
    # name: (sync layer factory, single-process factory, full-batch shape, split sizes, steps)
    "sync_batch_renorm_2d": (
        lambda: SyncBatchRenorm(3, **_renorm_kwargs()),
        lambda: BatchRenorm2d(3, **_renorm_kwargs()),
        (8, 3, 4, 3),
        (4, 4),
        3,
    ),
    "sync_batch_renorm_1d_paper_schedule_uneven": (
        lambda: SyncBatchRenorm(4, **_paper_kwargs()),
        lambda: BatchRenorm1d(4, **_paper_kwargs()),
        (7, 4),
        (4, 3),
        4,
    ),
    "sync_batch_norm_3d_input": (
        lambda: SyncBatchNorm(3, dtype=torch.float64),
        lambda: nn.BatchNorm1d(3, dtype=torch.float64),
        (6, 3, 5),
        (2, 4),
        3,
    ),
    "converted_conv_net": (
        lambda: convert_norm(_conv_net(), to="sync"),
        _conv_net,
        (6, 2, 5, 5),
        (3, 3),
        2,
    ),
}


def _init_affine(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if (
                getattr(m, "running_mean", None) is not None
                and getattr(m, "weight", None) is not None
            ):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))


def _inputs(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(steps)]
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return xs, gs


def _run(layer, xs, gs, rows, all_reduce_param_grads):
    """Training steps on the given rows of each batch; record outputs, grads and buffers."""
    _init_affine(layer, 5)
    record = {"y": [], "x_grad": [], "param_grads": []}
    for x_full, g_full in zip(xs, gs):
        x = x_full[rows].clone().requires_grad_()
        y = layer(x)
        (y * g_full[rows]).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        if all_reduce_param_grads:
            for grad in grads:  # what DDP does (as a sum here)
                dist.all_reduce(grad)
        record["y"].append(y.detach())
        record["x_grad"].append(x.grad)
        record["param_grads"].append(grads)
        layer.zero_grad()
    record["buffers"] = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k}
    layer.eval()
    record["eval_y"] = layer(xs[0][rows]).detach()
    return record


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for name, (make_sync, _, shape, split, steps) in CASES.items():
            xs, gs = _inputs(shape, steps, seed=len(name))
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
            results[name] = _run(make_sync(), xs, gs, rows, all_reduce_param_grads=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _spawn_and_wait(out_dir: str) -> None:
    port = free_port()
    context = mp.start_processes(
        _worker, args=(port, out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"2-rank gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("gloo"))
    _spawn_and_wait(out_dir)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_ranks_equal_single_process_on_concatenated_batch(two_rank_results, name):
    _, make_single, shape, split, steps = CASES[name]
    xs, gs = _inputs(shape, steps, seed=len(name))
    full = slice(0, shape[0])
    single = _run(make_single(), xs, gs, full, all_reduce_param_grads=False)
    ranks = [r[name] for r in two_rank_results]
    for step in range(steps):
        assert_close(torch.cat([r["y"][step] for r in ranks]), single["y"][step])
        assert_close(torch.cat([r["x_grad"][step] for r in ranks]), single["x_grad"][step])
        for rank in ranks:  # parameter grads summed over ranks = full-batch grads
            for got, expected in zip(rank["param_grads"][step], single["param_grads"][step]):
                assert_close(got, expected)
    for rank in ranks:  # identical running statistics on every rank, equal to one process's
        assert rank["buffers"].keys() == single["buffers"].keys()
        for key, value in single["buffers"].items():
            assert_close(rank["buffers"][key], value)
    assert_close(torch.cat([r["eval_y"] for r in ranks]), single["eval_y"])


# ----------------------------------------------------------------------------------------------
# Without a process group (or with one rank): the local computation
# ----------------------------------------------------------------------------------------------


def test_without_process_group_sync_layers_compute_locally():
    assert world_size() == 1
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    pairs = [
        (SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)),
        (SyncBatchRenorm(3, **_renorm_kwargs()), BatchRenorm2d(3, **_renorm_kwargs())),
    ]
    for sync, local in pairs:
        for mode in (True, False):
            sync.train(mode)
            local.train(mode)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = sync(xa), local(xb)
            ya.square().sum().backward()
            yb.square().sum().backward()
            assert_close(ya, yb)
            assert_close(xa.grad, xb.grad)
        assert_close(sync.running_var, local.running_var)


def test_sync_path_on_a_one_rank_group_matches_local_renorm():
    """The all-reduce code path itself, on a 1-rank gloo group inside this process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64) * 3 + 2
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        w = torch.rand(3, dtype=torch.float64) + 0.5
        b = torch.randn(3, dtype=torch.float64)
        mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.3
        results = []
        for fn in (sync_batch_renorm, batch_renorm):
            xx = x.clone().requires_grad_()
            ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
            rm, rv = mean.clone(), var.clone()
            if fn is sync_batch_renorm:
                y = fn(xx, rm, rv, ww, bb, 0.1, 1e-5, 2.0, 0.5, "std")
            else:
                y = fn(xx, rm, rv, ww, bb, True, 0.1, 1e-5, 2.0, 0.5, "std")
            (y * g).sum().backward()
            results.append((y, xx.grad, ww.grad, bb.grad, rm, rv))
        for a, b_ in zip(*results):
            assert_close(a, b_)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            sync_batch_renorm(torch.randn(1, 3), None, None, None, None, 0.1, 1e-5)
        # A large common offset: the two-pass variance does not cancel.
        xo = torch.randn(64, 2) + 1e4
        y = sync_batch_renorm(xo, None, None, None, None, 0.1, 1e-5)
        torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(2), rtol=1e-3, atol=1e-3)
    finally:
        dist.destroy_process_group()


def test_sync_input_dim_check():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchRenorm(3)(torch.randn(3))


def test_sync_batch_norm_state_dict_matches_torch():
    ours = SyncBatchNorm(4)
    theirs = nn.SyncBatchNorm(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(nn.BatchNorm2d(4).state_dict(), strict=True)
    brn = SyncBatchRenorm(4)
    brn.load_state_dict(nn.BatchNorm2d(4).state_dict(), strict=True)
