import subprocess
import sys

import pytest

from normlab.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "normlab" in capsys.readouterr().out
    for command in (["--help"], ["train", "--help"], ["study", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        assert "usage" in capsys.readouterr().out


def test_user_errors_have_no_traceback(capsys):
    assert main(["train", "model.widht=3"]) == 2
    err = capsys.readouterr().err
    assert "valid options" in err and "Traceback" not in err
    assert main(["train", "data=cifar10", "data.root=/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", "nope"]) == 2
    assert main(["study", "baseline", "speed=3"]) == 2


def test_train_report_and_list(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["train", "epochs=1", f"out={out}", "progress=false", "name=a"]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["train", "epochs=1", f"out={out}", "progress=false", "name=b", "seed=1"]) == 0
    assert main(["report", f"{out}/a", f"{out}/b"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| a | finished |" in report and (tmp_path / "curves.png").exists()
    assert main(["report", str(tmp_path)]) == 2  # not a run directory
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "resnet18" in listing and "multistep" in listing and "baseline" in listing


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("normlab ")


def test_a_diverged_run_says_so(tmp_path, capsys):
    args = ["train", f"out={tmp_path}", "progress=false", "optim.lr=1e9", "optim.momentum=0"]
    assert main([*args, "epochs=3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("diverged at epoch 1/3") and "nan" not in line
