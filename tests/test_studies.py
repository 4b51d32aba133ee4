import pytest

from normlab.errors import ConfigError
from normlab.plots import plt
from normlab.studies import RunSpec, Study, run_study
from normlab.studies.base import get_study


class TinyStudy(Study):
    name = "tiny"
    title = "Tiny"

    def runs(self, scale, data_root=None):
        base = {"data": "digits", "model": {"name": "mlp", "width": 16}, "epochs": 2}
        return [
            RunSpec("good-a", {**base, "seed": 0}, {"kind": "good"}),
            RunSpec("good-b", {**base, "seed": 1}, {"kind": "good"}),
            RunSpec("bad", {**base, "model": {"name": "mlp", "width": -1}}, {"kind": "bad"}),
        ]

    def analyze(self, results, report, scale):
        report.table(["run", "status"], [[r.spec.name, r.status] for r in results])
        fig, ax = plt.subplots()
        ax.plot([1, 2], [3, 4])
        report.figure(fig, "plot.png")
        report.data["statuses"] = {r.spec.name: r.status for r in results}


def test_study_records_failure_and_resumes(tmp_path):
    path = run_study(TinyStudy(), "quick", jobs=1, out=tmp_path, progress=False)
    text = path.read_text()
    assert "| good-a | finished |" in text and "| bad | failed |" in text
    assert "Runs that did not end" in text and "width >= 1" in text
    assert (tmp_path / "tiny" / "plot.png").stat().st_size > 1000
    assert (tmp_path / "tiny" / "runs" / "bad" / "error.txt").exists()
    summary = tmp_path / "tiny" / "runs" / "good-a" / "summary.json"
    before = summary.stat().st_mtime_ns
    run_study(TinyStudy(), "quick", jobs=1, out=tmp_path, progress=False)
    assert summary.stat().st_mtime_ns == before  # finished runs are skipped


def test_study_runs_in_parallel_workers(tmp_path):
    path = run_study(TinyStudy(), "quick", jobs=2, out=tmp_path, progress=False)
    assert "| good-b | finished |" in path.read_text()


def test_study_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="scale"):
        run_study(TinyStudy(), "huge", out=tmp_path)
    with pytest.raises(ConfigError, match="valid choices: baseline"):
        get_study("nope")


def test_sweep_axes_and_run(tmp_path):
    from normlab.cli import main
    from normlab.studies.sweep import parse_axis

    assert parse_axis("log:1e-4:1e-1:4") == [1e-4, 1e-3, 1e-2, 1e-1]
    assert parse_axis("lin:0:1:3") == [0.0, 0.5, 1.0]
    assert parse_axis("range:0:3") == [0, 1, 2] and parse_axis("a,b") == ["a", "b"]
    with pytest.raises(ConfigError, match="log:LO:HI:N"):
        parse_axis("log:1e-3:x:3")
    # an unknown key is caught before any run starts
    assert main(["sweep", "epochs=1", "model.widht=8,16", f"out={tmp_path}", "jobs=1"]) == 2
    assert not (tmp_path / "widht").exists()
    assert main(["sweep", "epochs=1", "model.width=8,16", f"out={tmp_path}", "jobs=1"]) == 0
    assert "| 16 | finished |" in (tmp_path / "width" / "report.md").read_text()


def test_sweep_survives_a_failing_run_and_resumes(tmp_path):
    from normlab.studies import run_study
    from normlab.studies.sweep import sweep_from_args

    study, extra = sweep_from_args(["epochs=1", "model.width=8,-1", "model.depth=2"], {})
    assert study.axes == {"model.width": [8, -1]}
    path = run_study(study, "quick", 1, tmp_path, progress=False)
    text = path.read_text()
    assert "| 8 | finished |" in text and "| -1 | failed |" in text
    ok = tmp_path / study.name / "runs" / "width=8" / "summary.json"
    before = ok.stat().st_mtime_ns
    run_study(study, "quick", 1, tmp_path, progress=False)
    assert ok.stat().st_mtime_ns == before
