"""The batch_size study: its grid of runs, its analysis, and a tiny end-to-end run."""

import json
import math

import pytest
import torch

from normlab import config as config_mod
from normlab.errors import UserError
from normlab.methods.norm_layers import study as bs
from normlab.models import build_model
from normlab.nn import BatchRenorm2d
from normlab.studies import RunSpec, get_study, run_study
from normlab.studies.base import RunResult


def specs_by_key(scale="quick", root=None):
    specs = get_study("batch_size").runs(scale, root)
    return {(s.labels["method"], s.labels["batch_size"]): s for s in specs}


def test_quick_grid_is_methods_by_batch_sizes_with_the_original_settings():
    specs = specs_by_key()
    assert set(specs) == {(m, b) for m in ("none", "bn", "brn", "gn") for b in bs.BATCH_SIZES}
    assert bs.BATCH_SIZES == (256, 128, 64, 32, 16, 4, 2, 1)
    assert len({s.name for s in specs.values()}) == 32
    for (method, batch_size), spec in specs.items():
        cfg = spec.config
        assert cfg["model"]["name"] == "lenet" and cfg["model"]["norm"] == method
        assert cfg["optim"]["lr"] == (0.001 if method == "none" else 0.01)
        assert cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["weight_decay"] == 5e-4
        assert cfg["schedule"] == {"name": "constant"} and cfg["batch_size"] == batch_size
        assert cfg["data"]["name"] == "digits" and cfg["data"]["resize"] == 28
        if method == "gn":
            assert cfg["model"]["norm_kwargs"]["num_groups"] == 2
        # Every config is valid for the training pipeline.
        resolved = config_mod.resolve(cfg)
        assert resolved["model"]["norm_kwargs"] == cfg["model"]["norm_kwargs"]


def test_quick_length_rule():
    specs = specs_by_key()
    for (_, batch_size), spec in specs.items():
        epochs, steps = spec.labels["epochs"], spec.labels["steps"]
        assert spec.config["epochs"] == epochs
        per_epoch = steps // epochs
        # the fewest epochs that reach the minimum number of steps, 2 at least down to batch 4
        floor = 2 if batch_size >= 4 else 1
        assert epochs == max(math.ceil(bs.QUICK_MIN_STEPS / per_epoch), floor)
        assert steps >= bs.QUICK_MIN_STEPS
    # 1437 digits: a lone last image at batch 2 and 4 is dropped (BN cannot normalize it).
    assert (
        specs[("bn", 2)].config["data"]["drop_last"]
        and specs[("bn", 4)].config["data"]["drop_last"]
    )
    assert not specs[("bn", 16)].config["data"]["drop_last"]
    assert specs[("bn", 256)].labels["steps"] == 60 and specs[("bn", 1)].labels["steps"] == 1437
    assert specs[("bn", 2)].labels["steps"] == 718


def test_quick_brn_schedule_is_scaled_to_the_run():
    specs = specs_by_key()
    for batch_size in bs.BATCH_SIZES:
        spec = specs[("brn", batch_size)]
        kw = spec.config["model"]["norm_kwargs"]
        steps = spec.labels["steps"]
        assert kw["warmup_steps"] == kw["r_max_ramp_steps"] == kw["d_max_ramp_steps"]
        assert kw["warmup_steps"] == round(steps / 6)
        assert (kw["r_max"], kw["d_max"], kw["schedule"]) == (3.0, 5.0, "paper")
        assert 0.01 <= kw["momentum"] <= 0.1
    assert specs[("brn", 256)].config["model"]["norm_kwargs"]["momentum"] == 0.1
    assert specs[("brn", 1)].config["model"]["norm_kwargs"]["momentum"] == pytest.approx(0.021)
    # the options reach every BatchRenorm2d layer of the LeNet
    kw = specs[("brn", 4)].config["model"]["norm_kwargs"]
    model = build_model("lenet", (1, 28, 28), 10, norm="brn", norm_kwargs=kw)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm2d)]
    assert len(layers) == 3 and all(m.warmup_steps == kw["warmup_steps"] for m in layers)


def test_paper_grid_needs_mnist_and_uses_the_original_schedule():
    with pytest.raises(UserError, match="data.root"):
        get_study("batch_size").runs("paper", None)
    specs = specs_by_key("paper", "/data/mnist")
    assert specs[("gn", 64)].config["data"] == {
        "name": "mnist",
        "root": "/data/mnist",
        "drop_last": False,
    }
    assert specs[("bn", 256)].config["epochs"] == 30 and specs[("gn", 1)].config["epochs"] == 10
    kw = specs[("brn", 256)].config["model"]["norm_kwargs"]
    per_epoch = math.ceil(60000 / 256)
    assert kw["momentum"] == 0.01
    assert kw["warmup_steps"] == 5 * per_epoch and kw["r_max_ramp_steps"] == 5 * per_epoch


def fake(method, batch_size, status="finished", acc=None, error=None, epochs=2):
    rows = [{"epoch": e, "test_acc": acc} for e in range(1, epochs + 1)] if acc is not None else []
    if status == "diverged":
        rows = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": float("nan")}]
    spec = RunSpec(f"{method}-bs{batch_size}", {}, {"method": method, "batch_size": batch_size})
    return RunResult(spec, None, status, {}, rows, error)


def test_outcomes_and_verdicts():
    message = "ValueError: Expected more than 1 value per channel when training, got input ..."
    results = [
        fake("none", 2, acc=0.40),  # 60 % error: untrained
        fake("bn", 2, acc=0.70),  # 30 %: more than 2x the best
        fake("brn", 2, status="diverged"),
        fake("gn", 2, acc=0.90),  # 10 %: the best
        fake("bn", 1, status="failed", error=message),
        fake("gn", 1, status="failed", error="RuntimeError: out of memory"),
    ]
    cells = {(r.spec.labels["method"], r.spec.labels["batch_size"]): bs.outcome(r) for r in results}
    assert cells[("gn", 2)]["error"] == pytest.approx(10.0)
    assert cells[("brn", 2)]["text"] == "diverged (epoch 2)"
    assert cells[("bn", 1)]["text"] == "cannot train"
    assert cells[("gn", 1)]["kind"] == "failed"
    at2 = bs.verdicts(cells, 2, bs.METHODS)
    assert [m for m, _ in at2["trains"]] == ["gn"]
    assert [m for m, _ in at2["degraded"]] == ["bn"]
    assert [m for m, _ in at2["untrained"]] == ["none"]
    assert [m for m, _ in at2["diverged"]] == ["brn"]
    at1 = bs.verdicts(cells, 1, bs.METHODS)
    assert at1 == {"cannot train": [("bn", None)], "failed": [("gn", None)]}


def test_tiny_study_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "METHODS", ("brn", "gn"))
    monkeypatch.setattr(bs, "BATCH_SIZES", (16, 1))
    monkeypatch.setattr(bs, "QUICK_DATA", {**bs.QUICK_DATA, "train_limit": 32, "test_limit": 32})
    monkeypatch.setattr(bs, "QUICK_MIN_STEPS", 1)
    monkeypatch.setattr(bs, "QUICK_MIN_EPOCHS", 1)
    torch.manual_seed(0)
    path = run_study(get_study("batch_size"), "quick", jobs=1, out=tmp_path, progress=False)
    text = path.read_text()
    folder = tmp_path / "batch_size"
    assert "This run (quick): final test error" in text
    assert "Original MatConvNet results" in text and "| GN (G=2) | 0.88 | 1.6 |" in text
    assert "| BRN | " in text and "cannot train" in text  # BRN at batch 1 (one value per channel)
    assert "Which methods train" in text and "Against the original" in text
    for png in ("curves.png", "final_error.png"):
        assert (folder / png).stat().st_size > 1000 and f"]({png})" in text
    data = json.loads((folder / "results.json").read_text())
    assert data["final_test_error"]["brn"]["1"] is None
    assert 0.0 <= data["final_test_error"]["gn"]["1"] <= 100.0
    assert "cannot train" in data["verdicts"]["1"] and data["verdicts"]["1"]["cannot train"] == [
        "brn"
    ]
    assert data["setup"]["16"] == {"epochs": 1, "steps": 2}
    # The study gives BRN its schedule in optimizer steps; the layers count training forwards.
    # In the one training loop these agree (evaluation runs in eval mode).
    state = torch.load(folder / "runs" / "brn-bs16" / "checkpoint.pt", weights_only=False)
    counters = [v for k, v in state["model"].items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 3 and all(int(c) == 2 for c in counters)
