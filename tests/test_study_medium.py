"""``scale=medium``: every study's grid on the real files (data.root), sized for a CPU."""

import pytest

from normlab.errors import UserError
from normlab.studies import get_study, study_names

ROOT = "/data/mnist"  # the grid is a plan: nothing is read until the runs start


@pytest.mark.parametrize(
    "name", ["baseline", "batch_size", "enorm", "riemannian_bn", "sphere_regimes"]
)
def test_medium_needs_the_files_and_uses_mnist(name):
    study = get_study(name)
    with pytest.raises(UserError, match="scale=medium .*data.root"):
        study.runs("medium", None)
    specs = study.runs("medium", ROOT)
    assert specs and len({s.name for s in specs}) == len(specs)
    for spec in specs:
        data = spec.config["data"]
        assert data["name"] == "mnist" and data["root"] == ROOT
        assert 0 < data["train_limit"] <= 10000  # the same subset with 19,690 or 60,000 files


def test_every_study_has_a_medium_grid():
    assert {"baseline", "batch_size", "enorm", "riemannian_bn", "sphere_regimes"} <= set(
        study_names()
    )
    for name in study_names():
        assert get_study(name).runs("medium", ROOT)


def test_batch_size_medium_covers_the_paper_batch_sizes_with_enough_steps():
    from normlab.methods.norm_layers import study as bs

    specs = get_study("batch_size").runs("medium", ROOT)
    sizes = sorted({s.labels["batch_size"] for s in specs}, reverse=True)
    assert sizes == [256, 128, 64, 32, 16, 4, 2, 1]
    assert {s.labels["method"] for s in specs} == set(bs.METHODS)
    for s in specs:
        assert s.labels["steps"] >= bs.MEDIUM_MIN_STEPS
        if s.labels["batch_size"] >= 4:
            assert s.labels["epochs"] >= 2


def test_riemannian_bn_medium_uses_the_papers_vgg():
    specs = get_study("riemannian_bn").runs("medium", ROOT)
    vggs = [s for s in specs if s.config["model"]["name"] == "vgg"]
    assert vggs and all(
        s.config["model"]["fc_layers"] == 2 and s.config["model"]["norm_scale"] is False
        for s in vggs
    )
    assert {s.labels["optimizer"] for s in specs} == {"SGD", "SGD-G", "Adam-G"}


def test_paper_riemannian_bn_vgg_is_the_papers():
    specs = get_study("riemannian_bn").runs("paper", ROOT)
    vgg = [s.config["model"] for s in specs if s.config["model"]["name"] == "vgg"]
    assert vgg and all(m["fc_layers"] == 2 and m["norm_scale"] is False for m in vgg)
