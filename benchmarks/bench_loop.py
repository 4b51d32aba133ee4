"""Overhead of normlab's training loop against a bare hand-written loop.

Both train the same model on the same in-memory data for the same number of epochs with an
evaluation after each epoch; normlab's loop also keeps its run directory (metrics.csv, summary,
checkpoint every epoch), tracks running loss/accuracy and checks each loss for divergence. The two
alternate round by round in one process (same background load); we report steps per second and the
median over rounds of the per-round time ratio.

    python benchmarks/bench_loop.py [--rounds 7] [--epochs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from normlab.data import InMemoryLoader, load_dataset, prepare_dataset
from normlab.models import build_model
from normlab.train import evaluate, train

CASES = {
    "mlp-bn (mnist1d, width 512)": (
        "mnist1d",
        {"name": "mlp", "depth": 3, "width": 512, "norm": "bn"},
        None,
    ),
    "convnet c=16 (digits 28x28)": ("digits", {"name": "convnet", "c": 16, "norm": "bn"}, 28),
}


def bare_loop(data, model_cfg, epochs, batch_size, seed):
    torch.manual_seed(seed)
    opts = {k: v for k, v in model_cfg.items() if k != "name"}
    model = build_model(model_cfg["name"], data.in_shape, data.num_classes, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = InMemoryLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed)
    test = InMemoryLoader(data.x_test, data.y_test, 1000)
    steps = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        evaluate(model, test)
    return steps


def normlab_loop(data, model_cfg, epochs, batch_size, seed, out):
    summary = train(
        {
            "data": {"name": data.name},
            "model": model_cfg,
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "out": out,
            "progress": False,
            "overwrite": True,
            "name": "bench",
        },
        dataset=data,
    )
    return summary["steps"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 epoch")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 2, 1
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {args.rounds} rounds x {args.epochs} epochs, batch 128\n"
    )
    print("| model | bare loop steps/s | normlab loop steps/s | overhead (median ratio - 1) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for label, (dataset, model_cfg, resize) in CASES.items():
            data = prepare_dataset(load_dataset(dataset), resize=resize)
            bare_loop(data, model_cfg, 1, 128, 0)  # warm-up
            ratios, bare_rates, ours_rates = [], [], []
            for r in range(args.rounds):
                order = [0, 1] if r % 2 == 0 else [1, 0]
                times = {}
                for which in order:
                    t = time.perf_counter()
                    if which == 0:
                        steps = bare_loop(data, model_cfg, args.epochs, 128, r)
                    else:
                        steps = normlab_loop(data, model_cfg, args.epochs, 128, r, out)
                    times[which] = time.perf_counter() - t
                bare_rates.append(steps / times[0])
                ours_rates.append(steps / times[1])
                ratios.append(times[1] / times[0])
            print(
                f"| {label} | {statistics.median(bare_rates):.0f} | "
                f"{statistics.median(ours_rates):.0f} | "
                f"{100 * (statistics.median(ratios) - 1):+.1f} % |"
            )


if __name__ == "__main__":
    main()
