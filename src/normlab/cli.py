"""The ``normlab`` command.

    normlab train [--config FILE.yaml|json] [key=value ...]
    normlab study NAME|all [scale=quick|medium|paper] [jobs=N] [out=DIR] [data.root=PATH]
    normlab sweep [--config FILE] KEY=V1,V2,... [KEY=log:LO:HI:N] [key=value ...] [jobs=N] [out=DIR]
    normlab report RUN_DIR... [--out DIR]
    normlab list [models|norms|optimizers|schedules|datasets|studies|extensions]

User errors (an unknown key, a missing data file, ...) print one line and exit with status 2;
Ctrl-C leaves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from . import __version__
from .errors import ConfigError, UserError

EXAMPLES_TRAIN = """\
examples:
  normlab train data=digits model=mlp epochs=5
  normlab train data=mnist1d model=mlp model.norm=bn optim.lr=0.05 epochs=30
  normlab train data=cifar10 data.root=~/data model=vgg model.depth=16 \\
      data.crop_padding=4 data.flip=0.5 schedule=multistep epochs=200
  normlab train --config run.yaml seed=3 resume=true

Keys are dotted (optim.lr=0.1); `normlab list` shows every model, optimizer, schedule, dataset and
extension with its options and defaults.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as exc:
        print(f"normlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file or folder the command was pointed at that the system refuses (missing,
        # permission denied, disk full): the user's to fix, so no traceback either.
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"normlab: error: cannot use{where}: {exc.strerror or exc}; check the path and its "
            "permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "\nnormlab: interrupted; a run stopped at a step boundary keeps a checkpoint of that "
            "step: run the same command with resume=true to continue (a study resumes by itself).",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization and scale-invariant training for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one run",
        description="Train one run; results go to OUT/NAME (default runs/<data>-<model>-...).",
        epilog=EXAMPLES_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="a .yaml or .json file with (part of) the config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "study",
        help="run a study (a grid of runs and its report)",
        description="Run a study and write OUT/NAME/report.md. Finished runs are skipped, so an "
        "interrupted study continues where it stopped.",
        epilog="options (key=value): scale=quick|medium|paper (default quick), jobs=N worker "
        "processes, threads=N torch threads per run (default: the cores shared among the "
        "workers), out=DIR (default studies_out), data.root=PATH (the dataset files for "
        "scale=medium and scale=paper)",
    )
    p.add_argument(
        "name", metavar="NAME", help="a study name or 'all' (see `normlab list studies`)"
    )
    p.add_argument("options", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser(
        "sweep",
        help="train a grid over config keys (parallel, resumable) and tabulate it",
        description="Train every combination of the swept keys. A key with several values is an "
        "axis: KEY=a,b,c, KEY=log:LO:HI:N (log-spaced), KEY=lin:LO:HI:N, KEY=range:A:B; any other "
        "key=value is a fixed override. Results go to OUT/NAME/ (out=sweeps by default; "
        "sweep_name=NAME, else named after the axes) with report.md.",
        epilog="example: normlab sweep data=mnist1d optim.lr=log:1e-3:1:4 seed=0,1 jobs=2",
    )
    p.add_argument("--config", help="a .yaml or .json file with the base config")
    p.add_argument("options", nargs="+", metavar="key=value")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="a table and curve plots for run directories",
        description="Write report.md with a table and curves for the given run directories.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for report.md (default: beside the runs)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("list", help="list the available choices and their options")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=[
            "all",
            "models",
            "norms",
            "optimizers",
            "schedules",
            "datasets",
            "studies",
            "extensions",
            "config",
        ],
    )
    p.set_defaults(func=_cmd_list)
    return parser


def _cmd_train(args) -> int:
    from .config import load_config_file
    from .train import train

    base = load_config_file(args.config) if args.config else {}
    summary = train(base, args.overrides)
    final = summary.get("final") or {}
    if summary["status"] == "diverged":  # the test figures of a NaN model say nothing
        print(
            f"diverged at epoch {final.get('epoch', summary['epochs_completed'])}/"
            f"{summary['epochs']} (the training loss became NaN or Inf), "
            f"results in {summary['run_dir']}"
        )
        return 0
    print(
        f"{summary['status']}: {summary['epochs_completed']}/{summary['epochs']} epochs, "
        f"test acc {_pct(final.get('test_acc'))}, results in {summary['run_dir']}"
    )
    return 0


def _cmd_study(args) -> int:
    from .config import parse_overrides
    from .studies import get_study, run_all, run_study, study_names

    options = parse_overrides(args.options)
    scale = options.pop("scale", "quick")
    jobs = options.pop("jobs", None)
    out = options.pop("out", "studies_out")
    threads = options.pop("threads", None)
    launcher = _launcher(options)
    data = options.pop("data", None)
    data_root = data.get("root") if isinstance(data, dict) else None
    if isinstance(data, dict) and set(data) - {"root"}:
        raise ConfigError("a study takes only data.root=PATH among the data options")
    if options:
        raise ConfigError(
            f"unknown study option(s) {sorted(options)}; valid: scale, jobs, threads, out, "
            "data.root, launcher, launcher.OPTION, wait, report_only, cancel"
        )
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"jobs must be a positive integer, got {jobs!r}")
    overrides = _threads_override(threads)
    names = study_names() if args.name == "all" else [get_study(args.name).name]
    if args.name == "all":
        path = run_all(scale, jobs, out, data_root, overrides=overrides, launcher=launcher)
    else:
        path = run_study(
            args.name, scale, jobs, out, data_root, overrides=overrides, launcher=launcher
        )
    if path is None:  # on the cluster, still queued or running (or just cancelled)
        return 0
    print(f"report: {path}")
    return _study_status(
        [(get_study(n), get_study(n).runs(scale, data_root), Path(out) / n) for n in names]
    )


def _launcher(options: dict) -> dict:
    """``launcher``, ``launcher.*`` and the cluster switches, popped from ``options``."""
    from .studies.launchers import SWITCHES, launcher_options

    launcher = launcher_options(options.pop("launcher", None))
    for key in SWITCHES:
        if key in options:
            value = options.pop(key)
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            if launcher["name"] == "local":
                raise ConfigError(f"{key}= applies to launcher=slurm only")
            launcher[key] = value
    return launcher


def _threads_override(threads) -> dict:
    if threads is None:
        return {}
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads must be an integer >= 0, got {threads!r}")
    return {"threads": threads}


def _study_status(parts) -> int:
    """0 when some runs ended; 1 (with a line saying so) when every run failed."""
    from .studies import collect_results

    results = [r for study, specs, folder in parts for r in collect_results(specs, folder)]
    failed = [r for r in results if r.status == "failed"]
    if results and len(failed) == len(results):
        print(f"normlab: every run failed ({len(failed)}); see the report", file=sys.stderr)
        return 1
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed; see the report", file=sys.stderr)
    return 0


def _cmd_sweep(args) -> int:
    from .config import load_config_file
    from .studies import run_study
    from .studies.sweep import sweep_from_args

    base = load_config_file(args.config) if args.config else {}
    study, extra = sweep_from_args(args.options, base)
    jobs = extra.get("jobs", 2)
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a positive integer, got {jobs!r}")
    out = extra.get("out", "sweeps")
    launcher = _launcher(extra)
    # every run's config is checked before any run starts
    path = run_study(study, "quick", jobs, out, launcher=launcher)
    if path is None:
        return 0
    print(f"report: {path}")
    return _study_status([(study, study.runs("quick"), Path(out) / study.name)])


def _cmd_report(args) -> int:
    from .report import report_runs

    print(f"report: {report_runs(args.run_dirs, args.out)}")
    return 0


def _cmd_list(args) -> int:
    print(describe(args.what))
    return 0


def describe(what: str = "all") -> str:
    """Human-readable listing of the registries (what `normlab list` prints)."""
    from . import config as cfg
    from .data import dataset_names
    from .models import model_names, model_options
    from .nn import norm_names
    from .studies import get_study, study_names
    from .train import optimizer_names
    from .train.optimizers import optimizer_spec
    from .train.schedules import schedule_names, schedule_spec

    sections = []

    def add(title, entries):
        lines = [f"{title}:"]
        for name, detail in entries:
            lines.append(f"  {name}")
            if detail:
                lines.append(textwrap.indent(textwrap.fill(detail, 96), "      "))
        sections.append("\n".join(lines))

    def opts(d):
        return ", ".join(f"{k}={v!r}" for k, v in d.items())

    if what in ("all", "config"):
        add("top-level keys", [(k, f"default {v!r}") for k, v in cfg.TOP_LEVEL_DEFAULTS.items()])
        add("data.* keys", [(k, f"default {v!r}") for k, v in cfg.DATA_DEFAULTS.items()])
    if what in ("all", "datasets"):
        add("datasets (data=NAME)", [(n, "") for n in dataset_names()])
    if what in ("all", "models"):
        add(
            "models (model=NAME, model.OPTION=VALUE)",
            [(n, opts(model_options(n))) for n in model_names()],
        )
    if what in ("all", "norms"):
        add("norms (model.norm=NAME)", [(n, "") for n in norm_names()])
    if what in ("all", "optimizers"):
        add(
            "optimizers (optim=NAME, optim.OPTION=VALUE)",
            [
                (n, f"{optimizer_spec(n).help}. {opts(optimizer_spec(n).defaults)}")
                for n in optimizer_names()
            ],
        )
    if what in ("all", "schedules"):
        add(
            "schedules (schedule=NAME)",
            [
                (n, f"{schedule_spec(n).help}. {opts(schedule_spec(n).defaults)}")
                for n in schedule_names()
            ],
        )
    if what in ("all", "extensions"):
        add(
            "extensions (NAME=true or NAME.OPTION=VALUE)",
            [(n, f"{e.help}. {opts(e.defaults)}") for n, e in cfg.extensions().items()],
        )
    if what in ("all", "studies"):
        add("studies (normlab study NAME)", [(n, get_study(n).title) for n in study_names()])
    return "\n\n".join(sections)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


if __name__ == "__main__":
    sys.exit(main())
