"""ENorm cost: one cycle (optimizer state included) against one torch.optim.SGD(momentum=0.9) step.

Two networks from the paper's code, defined inline:

* FC-15: 15 Linear layers of width 500 (input 3072, 10 classes), ReLU, no bias (4.79 M weights);
* the fully convolutional CIFAR network: 3x3 convs 3->128->128->128 (BN after the third),
  max pool, 128->256->256->256 (BN after the sixth), max pool, 3x3 256->320, 1x1 320->320,
  1x1 320->10 (padding 1), ReLU, 5x5 average pool, 28x28 crops (2.62 M weights).

Measured, interleaved in one process (round = SGD step, ENorm cycle, in shuffled order),
median of the per-round ratios:

1. ``cycle / sgd``: one ENorm cycle with momentum-buffer rescaling vs one SGD step (momentum
   0.9, same gradients every round), for the sequential and the simultaneous order, each eager
   and ``fused=True`` (one compiled function per cycle; its compile time, paid once at the
   first cycle, is reported beside);
2. ``share``: ENorm cycle / (forward + backward + SGD step + ENorm cycle) at batch 256.

Usage: python benchmarks/bench_enorm.py [--quick] [--threads N] [--device cpu|cuda] [--clock cpu]
       [--no-fused]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from normlab.enorm import ENorm


def fc15(in_features: int = 3072, width: int = 500, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [in_features] + [width] * 14 + [classes]
    for i in range(15):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
        if i < 14:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FullyConvolutional(nn.Module):
    """The seed's fully convolutional network (biases off, BN after conv3 and conv6)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        chans = [(3, 128), (128, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in chans)
        self.bn1, self.bn2 = nn.BatchNorm2d(128), nn.BatchNorm2d(256)
        self.conv7 = nn.Conv2d(256, 320, 3, padding=1, bias=False)
        self.conv8 = nn.Conv2d(320, 320, 1, bias=False)
        self.conv9 = nn.Conv2d(320, classes, 1, padding=1, bias=False)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == 2:
                x = self.bn1(x)
            if i == 5:
                x = self.bn2(x)
            x = F.relu(x)
            if i in (2, 5):
                x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = F.relu(self.conv8(F.relu(self.conv7(x))))
        x = F.avg_pool2d(F.relu(self.conv9(x)), 5)
        return x.view(x.size(0), -1)


ORDERS = ("sequential", "simultaneous")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time (steadier on a shared machine)


def _time(fn, device) -> float:
    _sync(device)
    start = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - start


def _setup(name: str, device: torch.device, batch: int):
    torch.manual_seed(0)
    if name == "fc15":
        model, shape = fc15(), (3, 32, 32)
    else:
        model, shape = FullyConvolutional(), (3, 28, 28)
    model.to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    # A tiny learning rate keeps the weights where they are over thousands of rounds.
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    return model, opt, x, y


def bench_cycle(name: str, device, rounds: int, warmup: int, fused: bool = True) -> dict:
    model, opt, x, y = _setup(name, device, batch=8)
    F.cross_entropy(model(x), y).backward()  # gradients reused by every SGD step
    opt.step()  # momentum buffers exist, so the cycle rescales them
    variants = [(order, False) for order in ORDERS] + ([(o, True) for o in ORDERS] if fused else [])
    enorms = {}
    out: dict = {}
    for order, is_fused in variants:
        key = f"{order}_fused" if is_fused else order
        enorms[key] = enorm = ENorm(model, opt, c=1.1, order=order, fused=is_fused)
        if is_fused:
            start = time.perf_counter()
            enorm.cycle()  # compiles
            out[f"{key}_compile_s"] = time.perf_counter() - start
            out[f"{key}_compiles"] = enorm.compiles
            if enorm.fused_form != "in place":
                print(f"note: {name} {order}: the fused cycle runs {enorm.fused_form}")
    fns = {"sgd": opt.step} | {k: e.cycle for k, e in enorms.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(warmup + rounds):
        random.shuffle(keys)
        for k in keys:
            t = _time(fns[k], device)
            if r >= warmup:
                times[k].append(t)
    out["sgd_ms"] = 1e3 * statistics.median(times["sgd"])
    for key, enorm in enorms.items():
        out[f"{key}_ms"] = 1e3 * statistics.median(times[key])
        out[f"{key}_ratio"] = statistics.median(a / b for a, b in zip(times[key], times["sgd"]))
        if enorm.fused:
            assert enorm.compiles == out[f"{key}_compiles"], "the fused cycle recompiled"
    out["weights_m"] = sum(p.numel() for p in model.parameters() if p.dim() > 1) / 1e6
    out["managed"] = len(enorms["sequential"].parameter_names)
    return out


def bench_share(name: str, device, rounds: int, warmup: int, batch: int) -> dict:
    model, opt, x, y = _setup(name, device, batch=batch)
    enorm = ENorm(model, opt, c=1.1)

    def train_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    fns = {"train": train_step, "enorm": enorm.cycle}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k in fns:
            t = _time(fns[k], device)
            if r >= warmup:
                times[k].append(t)
    shares = [e / (t + e) for t, e in zip(times["train"], times["enorm"])]
    return {
        "train_ms": 1e3 * statistics.median(times["train"]),
        "enorm_ms": 1e3 * statistics.median(times["enorm"]),
        "share": statistics.median(shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, small batch: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-fused", action="store_true", help="eager cycles only (no compile)")
    parser.add_argument("--batch", type=int, default=256, help="batch of the training iteration")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (with --threads 1 on a loaded machine)",
    )
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures CPU time: use it with --device cpu")
        CLOCK = time.process_time
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rounds, warmup = (15, 3) if args.quick else (300, 20)
    share_rounds, share_warmup = (2, 1) if args.quick else (10, 2)
    batch = 16 if args.quick else args.batch
    print(
        f"# ENorm benchmark | torch {torch.__version__} | {platform.processor() or platform.machine()}"
        f" | device {device} | threads {torch.get_num_threads()} | clock {args.clock} | "
        f"{'QUICK (noisy)' if args.quick else 'full'}"
    )
    fused = not args.no_fused
    head = "| network | weights (M) | SGD step ms "
    rule = "|---|---|---"
    for order in ORDERS:
        head += f"| {order} eager ms (x SGD) "
        rule += "|---"
        if fused:
            head += f"| {order} fused ms (x SGD) "
            rule += "|---"
    if fused:
        head += "| compile s (seq / sim) "
        rule += "|---"
    print(head + f"| train iter ms (batch {batch}) | ENorm share |")
    print(rule + "|---|---|")
    for name in ("fc15", "fullyconv"):
        c = bench_cycle(name, device, rounds, warmup, fused)
        s = bench_share(name, device, share_rounds, share_warmup, batch)
        row = f"| {name} | {c['weights_m']:.2f} | {c['sgd_ms']:.2f} "
        for order in ORDERS:
            for key in (order, f"{order}_fused") if fused else (order,):
                row += f"| {c[key + '_ms']:.2f} ({c[key + '_ratio']:.2f}x) "
        if fused:
            row += (
                f"| {c['sequential_fused_compile_s']:.1f} / "
                f"{c['simultaneous_fused_compile_s']:.1f} "
            )
        print(row + f"| {s['train_ms']:.0f} | {100 * s['share']:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
