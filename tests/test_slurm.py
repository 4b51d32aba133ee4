"""launcher=slurm against a real one-node Slurm (scripts/start_slurm.sh starts it, as root).

Where Slurm cannot be started here (not root, no package), the tests are skipped with the reason;
under CI (CI=true) they must run, so there a Slurm that does not come up is a failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time", "images_per_s", "peak_memory_mb")
SLURM = ["launcher=slurm", "launcher.cpus_per_run=1", "launcher.mem_gb=2", "progress=false"]


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return done.returncode == 0 and ("idle" in done.stdout or "mix" in done.stdout)


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        reason = None
        if os.geteuid() != 0:
            reason = "not root: scripts/start_slurm.sh cannot install or start Slurm"
        else:
            done = subprocess.run(
                ["bash", str(REPO / "scripts" / "start_slurm.sh")],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if done.returncode != 0:
                reason = f"scripts/start_slurm.sh failed: {(done.stderr or done.stdout)[-800:]}"
        if reason:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must run the Slurm tests: {reason}")
            print(f"skipping the Slurm tests: {reason}")
            pytest.skip(reason)
    return True


@pytest.fixture
def shared_dir():
    # compute nodes must see the study folder: not under /tmp (here it is the same machine, but
    # the launcher warns about /tmp, and these tests check that it does not need to)
    base = REPO / ".slurm-test-runs"
    base.mkdir(exist_ok=True)
    folder = Path(
        subprocess.run(
            ["mktemp", "-d", f"{base}/t.XXXXXX"], capture_output=True, text=True
        ).stdout.strip()
    )
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _normlab(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normlab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _runs(out: Path) -> list[Path]:
    return sorted(out.glob("*/runs/*"))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _rows(run: Path) -> list[dict]:
    from normlab.train import read_metrics_csv

    return [
        {k: v for k, v in row.items() if k not in TIMING and not k.endswith("seconds")}
        for row in read_metrics_csv(run / "metrics.csv")
    ]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_sweep_runs_on_slurm_and_a_second_submission_submits_nothing(slurm, shared_dir):
    args = ["sweep", "data=digits", "epochs=2", "seed=0,1,2", f"out={shared_dir}", *SLURM]
    done = _normlab(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 missing; submitting 3" in done.stdout and "report:" in done.stdout
    runs = _runs(shared_dir)
    assert [_summary(r)["status"] for r in runs] == ["finished"] * 3
    report = (shared_dir / "seed" / "report.md").read_text()
    assert report.count("| finished |") == 3
    jobs = [json.loads((r / "slurm_job.json").read_text())["job_id"] for r in runs]
    assert len(set(jobs)) == 3 and len({j.split("_")[0] for j in jobs}) == 1  # one job array
    again = _normlab(*args)
    assert again.returncode == 0 and "3 finished; submitting 0" in again.stdout
    assert [json.loads((r / "slurm_job.json").read_text())["job_id"] for r in runs] == jobs


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_to_the_same_numbers(slurm, shared_dir):
    common = ["data=digits", "model.width=32", "epochs=1200", "checkpoint_interval=0", "threads=1"]
    reference = _normlab("train", *common, f"out={shared_dir}/local", "name=ref", "progress=false")
    assert reference.returncode == 0, reference.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "normlab", "sweep", *common, "seed=range:0:1"]
        + [f"out={shared_dir}/slurm", *SLURM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = shared_dir / "slurm" / "seed" / "runs" / "seed=0"
        _wait(lambda: (run / "metrics.csv").exists(), 180, "the job to start training")
        _wait(lambda: len(_rows(run)) >= 20, 180, "20 epochs")
        job = json.loads((run / "slurm_job.json").read_text())["job_id"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # as before a time limit
        _wait(lambda: _summary(run)["status"] == "interrupted", 120, "the exact checkpoint")
        # Slurm holds a requeued job for a while (BeginTime); release it now
        _wait(
            lambda: (
                subprocess.run(
                    ["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True
                ).returncode
                == 0
            ),
            120,
            "the requeued job",
        )
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    attempts = json.loads((run / "slurm_attempts.json").read_text())
    assert len(attempts) >= 2  # started, preempted, requeued, started again
    assert _summary(run)["status"] == "finished"
    assert _rows(run) == _rows(shared_dir / "local" / "ref")  # every number, every epoch


def test_cancel_cancels_the_studys_jobs(slurm, shared_dir):
    args = ["sweep", "data=digits", "epochs=100000", "seed=0,1", f"out={shared_dir}", *SLURM]
    done = _normlab(*args, "wait=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run the same command again" in done.stdout
    cancelled = _normlab(*args, "cancel=true")
    assert cancelled.returncode == 0 and "cancelled 2 job(s)" in cancelled.stdout
    jobs = [json.loads((r / "slurm_job.json").read_text())["job_id"] for r in _runs(shared_dir)]

    def gone():
        queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
        return not set(jobs) & set(queue.stdout.split())

    _wait(gone, 120, "the jobs to leave the queue")
    # re-entry: the cancelled runs ended without a result, so they are named and submitted again
    again = _normlab(*args, "wait=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 missing; submitting 2" in again.stdout
    assert again.stdout.count("ended without a result") == 2
    assert "_0_log.err" in again.stdout
    new_jobs = [json.loads((r / "slurm_job.json").read_text())["job_id"] for r in _runs(shared_dir)]
    assert not set(new_jobs) & set(jobs)
    assert _normlab(*args, "cancel=true").returncode == 0
    jobs = new_jobs
    _wait(gone, 120, "the resubmitted jobs to leave the queue")  # before the folder is removed


def test_bad_setups_are_one_line_errors(slurm, shared_dir, capsys):
    base = ["sweep", "data=digits", "epochs=1", "seed=0,1", f"out={shared_dir}"]
    assert main([*base, *SLURM, "launcher.partition=nope"]) == 2
    assert "unknown Slurm partition 'nope'" in capsys.readouterr().err
    assert main([*base, "launcher=slurm", "launcher.gpu=1"]) == 2
    assert "valid options" in capsys.readouterr().err
    assert main([*base, "launcher=cloud"]) == 2
    assert "unknown launcher 'cloud'" in capsys.readouterr().err
    assert main([*base, "wait=false"]) == 2
    assert "applies to launcher=slurm only" in capsys.readouterr().err
    env = {**os.environ, "PATH": "/nonexistent"}
    done = _normlab(*base, *SLURM, env=env)
    assert done.returncode == 2 and "needs Slurm's sbatch on the PATH" in done.stderr
    assert "Traceback" not in done.stderr


def test_tmp_output_is_warned_about(slurm, tmp_path):
    done = _normlab("sweep", "data=digits", "epochs=1", "seed=0,1", f"out={tmp_path}", *SLURM)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "under /tmp" in done.stderr


def test_missing_submitit_is_a_clear_error(monkeypatch):
    from normlab.studies.launchers import slurm as launcher

    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserError, match=r"pip install 'normlab\[slurm\]'"):
        launcher.check_environment(None)


def test_launcher_options_are_checked():
    from normlab.studies.launchers import SLURM_DEFAULTS, launcher_options

    assert launcher_options(None) == {"name": "local"}
    resolved = launcher_options({"name": "slurm", "partition": "gpu", "setup": "module load x"})
    assert resolved["setup"] == ["module load x"] and set(SLURM_DEFAULTS) < set(resolved)
    with pytest.raises(ConfigError, match="launcher.timeout_min must be >= 2"):
        launcher_options({"name": "slurm", "timeout_min": 1})
    with pytest.raises(ConfigError, match="launcher.max_timeouts must be >= 0"):
        launcher_options({"name": "slurm", "max_timeouts": -1})
    with pytest.raises(ConfigError, match="takes no options"):
        launcher_options({"name": "local", "partition": "gpu"})


def test_a_job_imports_the_submitters_normlab(slurm, shared_dir):
    # a checkout run with a relative PYTHONPATH=src and a job that starts in /: the job must
    # import this checkout's normlab (not fail, nor pick up another install of it)
    env = {**os.environ, "PYTHONPATH": "src"}
    probe = "python3 -c 'import normlab; print(\"normlab from\", normlab.__file__)'"
    args = ["sweep", "data=digits", "epochs=1", "seed=0,1", f"out={shared_dir}", *SLURM]
    args += ['launcher.slurm_extra={"chdir": "/"}', f"launcher.setup={probe}"]
    done = subprocess.run(
        [sys.executable, "-m", "normlab", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [_summary(r)["status"] for r in _runs(shared_dir)] == ["finished"] * 2
    logs = sorted((shared_dir / "seed" / "slurm").glob("*/*_log.out"))
    assert len(logs) == 2
    for log in logs:
        assert f"normlab from {REPO / 'src' / 'normlab' / '__init__.py'}" in log.read_text()


def test_the_queue_is_read_or_the_command_stops(slurm, tmp_path, monkeypatch):
    from normlab.studies.launchers import slurm as launcher

    # a job id Slurm does not know (it left the queue long ago): no jobs, not an error
    assert launcher.queue_states(["999999999_0"]) == {}
    # a controller that does not answer: an error, not "every run is missing" (which would
    # submit every run a second time)
    fake = tmp_path / "squeue"
    fake.write_text(
        "#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(UserError, match="Unable to contact slurm controller"):
        launcher.queue_states(["1_0"])


def test_a_stop_after_the_last_step_is_not_requeued(tmp_path, monkeypatch):
    # the warning signal can land during the last step: the run ends complete (the loop still
    # raises KeyboardInterrupt for its caller), and the job must return instead of requeueing
    import signal

    from normlab.studies import base
    from normlab.studies.launchers.slurm import SlurmRun

    cfg = {"out": str(tmp_path), "name": "r", "data": {"name": "digits"}, "epochs": 1}
    requeued = []

    def train_then_stop(config, threads=None):
        run = tmp_path / "r"
        run.mkdir(exist_ok=True)
        (run / "summary.json").write_text(json.dumps({"status": "finished"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "execute_one", train_then_stop)

    def submitits_handler(*args):
        requeued.append(args)

    previous = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        assert SlurmRun(cfg)() == "finished"
        assert requeued == []
        assert signal.getsignal(signal.SIGUSR2) is submitits_handler  # put back
        (tmp_path / "r" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
        monkeypatch.setattr(
            base, "execute_one", lambda c, threads=None: (_ for _ in ()).throw(KeyboardInterrupt)
        )
        with pytest.raises(KeyboardInterrupt):
            SlurmRun(cfg)()
        assert len(requeued) == 1  # interrupted mid-run: submitit's handler requeues it
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_study_all_submits_every_study_before_waiting(monkeypatch, tmp_path):
    from normlab.studies import base

    calls = []

    def fake_run_study(name, scale, jobs, out, data_root, progress, overrides, launcher):
        calls.append((name, launcher.get("wait", True)))
        return tmp_path / name / "report.md"

    monkeypatch.setattr(base, "run_study", fake_run_study)
    slurm = {"name": "slurm"}
    assert (
        base.run_all(out=tmp_path, names=["baseline", "enorm"], launcher=slurm)
        == tmp_path / "report.md"
    )
    assert calls == [("baseline", False), ("enorm", False), ("baseline", True), ("enorm", True)]
    calls.clear()
    base.run_all(out=tmp_path, names=["baseline", "enorm"], launcher={**slurm, "wait": False})
    assert calls == [("baseline", False), ("enorm", False)]  # nothing to wait for: one pass
    calls.clear()
    base.run_all(out=tmp_path, names=["baseline", "enorm"], launcher={"name": "local"})
    assert calls == [("baseline", True), ("enorm", True)]
