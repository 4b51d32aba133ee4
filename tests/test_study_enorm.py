"""The ``enorm`` study: the grid carries the paper's settings; a tiny version writes the report."""

import math

import pytest

from normlab.config import resolve
from normlab.errors import UserError
from normlab.methods.enorm import study as enorm_study
from normlab.studies import get_study, run_study


def by_name(specs):
    return {s.name: s for s in specs}


def test_quick_grid_has_the_original_settings():
    specs = get_study("enorm").runs("quick")
    runs = by_name(specs)
    assert len(specs) == 2 * 4 * 3 + 3 * 3 * 3  # (fc, conv) x variants x seeds + batch part
    for spec in specs:
        resolve(spec.config)  # every config is valid
    fc = runs["fc-none-s0"].config
    assert fc["model"] == {"name": "fully_connected", "depth": 15, "width": 64, "norm": "none"}
    assert fc["optim"] == {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 1e-3}
    assert fc["schedule"] == {"name": "linear"} and fc["batch_size"] == 256
    assert fc["enorm"] == {"c": 1.2, "apply": False}  # measured, not applied
    assert runs["fc-enorm-s1"].config["enorm"] == {"c": 1.2, "apply": True}
    bn_enorm = runs["fc-bn-enorm-s2"].config
    assert bn_enorm["model"]["norm"] == "bn" and bn_enorm["enorm"]["apply"] is True
    conv = runs["conv-enorm-s0"].config
    assert conv["model"]["name"] == "fully_conv" and conv["data"]["name"] == "mnist1d"
    assert conv["optim"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    assert conv["enorm"] == {"c": 1.1, "apply": True}
    assert runs["conv-none-s0"].labels == {
        "part": "main", "net": "conv", "variant": "none", "seed": 0
    }  # fmt: skip
    # batch part: sqrt lr scaling, enough steps, last partial batch dropped (BN needs > 1 sample)
    for b, epochs in ((256, 60), (16, 4), (4, 2)):
        cfg = runs[f"batch{b}-bn-s0"].config
        assert cfg["batch_size"] == b and cfg["epochs"] == epochs
        assert cfg["optim"]["lr"] == pytest.approx(0.1 * math.sqrt(b / 256))
        assert cfg["data"] == {"name": "digits", "drop_last": True}
        assert (1437 // b) * epochs >= enorm_study.QUICK_MIN_STEPS
    assert runs["batch4-enorm-s0"].config["model"]["norm"] == "none"
    assert runs["batch4-enorm-s0"].config["enorm"]["apply"] is True
    assert runs["batch4-bn-s0"].config["enorm"]["apply"] is False


def test_paper_grid_needs_cifar10_and_uses_the_original_epochs(tmp_path):
    study = get_study("enorm")
    with pytest.raises(UserError, match="data.root"):
        study.runs("paper")
    runs = by_name(study.runs("paper", str(tmp_path)))
    fc, conv = runs["fc-enorm-s0"].config, runs["conv-bn-enorm-s2"].config
    assert fc["epochs"] == 60 and conv["epochs"] == 128
    assert fc["model"]["width"] == 500 and conv["model"]["width"] == 128
    for cfg in (fc, conv):
        assert cfg["data"]["name"] == "cifar10" and cfg["data"]["root"] == str(tmp_path)
        assert cfg["data"]["train_limit"] == 40960
    assert conv["data"]["crop_padding"] == 2 and "crop_padding" not in fc["data"]
    assert runs["batch4-enorm-s0"].config["epochs"] == 60


def test_tiny_study_writes_tables_and_figures(tmp_path, monkeypatch):
    networks = {
        net: {
            **setting,
            "epochs": {"paper": 1, "quick": 2},
            "model": {**setting["model"], "quick": {**setting["model"]["quick"], "width": 4}},
            "data": {**setting["data"], "quick": {"name": "digits", "train_limit": 256}},
        }
        for net, setting in enorm_study.NETWORKS.items()
    }
    networks["fc"]["model"]["quick"]["depth"] = 4
    monkeypatch.setattr(enorm_study, "NETWORKS", networks)
    monkeypatch.setitem(
        enorm_study.BATCH_PART, "quick", {**enorm_study.BATCH_PART["quick"], "width": 8}
    )
    monkeypatch.setattr(enorm_study, "SEEDS", (0,))
    monkeypatch.setattr(enorm_study, "BATCH_SIZES", (64, 16))
    monkeypatch.setattr(enorm_study, "QUICK_MIN_STEPS", 4)
    monkeypatch.setattr(enorm_study, "VARIANTS", ("none", "enorm"))
    path = run_study("enorm", "quick", jobs=1, out=tmp_path, progress=False)
    text = path.read_text()
    assert "Runs: 10 (10 ended, 0 failed)" in text
    assert (
        "## With and without ENorm" in text and "| FC-15 (15 Linear layers) | ENorm | 1/1 |" in text
    )
    assert "| method | batch 64 | batch 16 |" in text and "| BN |" in text
    assert "not in notes" in text  # the paper column, labelled, never invented
    for name in ("curves.png", "objective.png", "batch_size.png"):
        assert (tmp_path / "enorm" / name).stat().st_size > 5000
    assert f"]({name})" in text
