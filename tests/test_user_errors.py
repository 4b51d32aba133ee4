"""Every user error reaches the CLI as one line naming the problem and the fix, exit status 2.

Each case below leaked a ValueError/RuntimeError/OSError traceback (exit 1) or ran on a value that
makes no sense before the one error path existed (issue 9).
"""

import pytest
import torch

from normlab import config as config_mod
from normlab.cli import main
from normlab.errors import ConfigError, UserError, config_errors

BASE = ["train", "data=digits", "epochs=1", "progress=false", "checkpoint=false"]


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("normlab: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lr=-1"], "optim.lr must be >= 0"),
        (["optim.weight_decay=-1"], "optim.weight_decay must be >= 0"),
        (["optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
        (["optim=adamg", "model.norm=bn", "optim.beta2=1.5"], "optim.beta2 must be in [0, 1)"),
        (["optim=sphere", "model=mlp_si", "optim.elr=0"], "optim.elr must be > 0"),
        (["schedule=multistep", "schedule.gamma=0"], "schedule.gamma must be > 0"),
        (["schedule=multistep", "schedule.milestones=[-1]"], "milestones must be >= 0"),
        (["schedule=linear", "schedule.end_factor=-1"], "schedule.end_factor must be >= 0"),
        (["schedule=cosine", "schedule.end_factor=-0.5"], "schedule.end_factor must be >= 0"),
        (["threads=-1"], "threads must be >= 0"),
        (["data.train_limit=-1"], "data.train_limit must be >= 0"),
        (["data.test_limit=-3"], "data.test_limit must be >= 0"),
        (["data.flip=2"], "data.flip must be in [0, 1]"),
        (["data.crop_padding=-1"], "data.crop_padding must be >= 0"),
        (["data.resize=0"], "data.resize must be >= 1"),
        (["epochs=-1"], "epochs must be >= 0"),
        (["batch_size=0"], "batch_size must be >= 1"),
        (["checkpoint_interval=-5"], "checkpoint_interval must be >= 0"),
    ],
)
def test_values_that_make_no_sense_are_refused_before_the_run(
    capsys, tmp_path, overrides, expected
):
    line = _one_line_error(capsys, [*BASE, f"out={tmp_path}", *overrides])
    assert expected in line
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) for a refused value"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # the builders' own ValueErrors, named by the section to fix
        (["model.norm=gn", "model.norm_kwargs.num_groups=3"], "model: num_groups=3"),
        (["model.depth=0"], "model: MLP needs depth >= 1"),
        (["data.padding_mode=wrap", "data.crop_padding=2"], "data: "),
        (["optim=sphere"], "found no scale-invariant parameters"),
        (["optim=sgdg"], "found no weights that feed a normalization layer"),
        (["optim=adamg"], "found no weights that feed a normalization layer"),
        (["enorm.c=-1"], "enorm"),
    ],
)
def test_component_errors_reach_the_cli_as_config_errors(capsys, tmp_path, overrides, expected):
    line = _one_line_error(capsys, [*BASE, f"out={tmp_path}", *overrides])
    assert expected in line


def test_sgdg_on_a_model_without_bn_fed_weights_is_an_error_not_nesterov_sgd():
    with pytest.raises(ConfigError, match="model.norm=bn"):
        config = {"data": "digits", "model": "mlp", "optim": "sgdg", "epochs": 0}
        from normlab import train

        train({**config, "checkpoint": False, "progress": False, "out": "/nonexistent-never"})


def test_unwritable_output_folder_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _one_line_error(capsys, [*BASE, f"out={blocker}"])
    assert str(blocker) in line and "write elsewhere" in line


def test_damaged_checkpoint_on_resume_is_one_line(capsys, tmp_path):
    argv = ["train", "data=digits", "epochs=1", "progress=false", f"out={tmp_path}", "name=r"]
    assert main(argv) == 0
    capsys.readouterr()
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk
    line = _one_line_error(capsys, [*argv[:2], "epochs=2", *argv[3:], "resume=true"])
    assert "cannot read the checkpoint" in line and "overwrite=true" in line
    torch.save({"not": "a checkpoint"}, ckpt)
    line = _one_line_error(capsys, [*argv[:2], "epochs=2", *argv[3:], "resume=true"])
    assert "not a normlab checkpoint" in line


def test_missing_config_file_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", "--config", str(tmp_path / "none.yaml")])
    assert "not found" in line


def test_config_errors_converts_value_errors_only():
    with pytest.raises(ConfigError, match=r"^model: bad width \(see the docs\)$"):
        with config_errors("model", "see the docs"):
            raise ValueError("bad width")
    with pytest.raises(UserError, match="^kept$"):  # a UserError passes through unchanged
        with config_errors("model", "see the docs"):
            raise UserError("kept")
    with pytest.raises(RuntimeError):  # not a config problem: not converted
        with config_errors("model", "see the docs"):
            raise RuntimeError("a bug")


def test_bound_describes_and_checks():
    b = config_mod.Bound(0.0, 1.0, high_open=True)
    assert b.describe() == "in [0, 1)"
    assert b.holds(0.0) and b.holds(0.5) and not b.holds(1.0) and not b.holds(-0.1)
    assert b.holds(None) and not b.holds(float("nan")) and not b.holds(True)
    assert config_mod.POSITIVE.describe() == "> 0" and not config_mod.POSITIVE.holds(0)


def test_enorm_is_exported():
    import normlab

    assert "ENorm" in normlab.__all__ and normlab.ENorm is not None
