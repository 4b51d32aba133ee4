"""The layout's promises: the loop knows no method, imports stay light, options are written once."""

import ast
import inspect
import json
import pathlib
import subprocess
import sys

import normlab
from normlab import config, registry
from normlab.enorm import ENorm

SRC = pathlib.Path(normlab.__file__).parent


def _imported_modules(path: pathlib.Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_training_loop_imports_no_method_module():
    offenders = {}
    for path in (SRC / "train").glob("*.py"):
        imported = _imported_modules(path, "normlab.train")
        bad = sorted(
            m
            for m in imported
            if m.startswith("normlab.methods")
            or m.startswith("normlab.studies")
            or m in ("normlab.optim", "normlab.enorm", "normlab.scale_invariance")
            or m.startswith(("normlab.optim.", "normlab.enorm.", "normlab.scale_invariance."))
        )
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"train/ must know no method: {offenders}"


def _modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_importing_the_library_loads_no_plotting_studies_or_sklearn():
    for statement in ("import normlab", "import normlab.optim", "import normlab.nn"):
        loaded = _modules_after(statement)
        heavy = [
            m
            for m in loaded
            if m.split(".")[0] in ("matplotlib", "sklearn", "mnist1d", "scipy")
            or m.startswith(("normlab.studies", "normlab.methods.", "normlab.plots"))
        ]
        assert not heavy, f"{statement} loads {heavy[:8]}"


def test_method_names_appear_on_first_lookup_and_resolving_a_run_loads_no_plotting():
    loaded = _modules_after(
        "import normlab\n"
        "from normlab.train import optimizer_names\n"
        "assert {'sgdg', 'adamg', 'sphere'} <= set(optimizer_names())\n"
        "from normlab.models import model_names\n"
        "assert {'fully_conv', 'mlp_si'} <= set(model_names())\n"
        "normlab.resolve_config({'optim': 'sgdg', 'enorm': True})"
    )
    assert "normlab.methods.riemannian_bn.optimizers" in loaded
    assert not [m for m in loaded if m.split(".")[0] == "matplotlib"]
    assert not [m for m in loaded if m.endswith(".study")]


def test_every_method_package_has_a_register_and_a_docstring():
    import importlib

    for name in registry.METHOD_PACKAGES:
        package = importlib.import_module(name)
        assert callable(package.register), name
        assert package.__doc__ and "tests" in package.__doc__, name


def test_enorm_options_are_enorm_signature():
    defaults = config.extensions()["enorm"].defaults
    enorm_keywords = [
        p for p in inspect.signature(ENorm).parameters if p not in ("model", "optimizer")
    ]
    assert list(defaults) == [*enorm_keywords, "apply"]
    assert defaults["c"] == inspect.signature(ENorm).parameters["c"].default
    assert defaults["exclude"] == []


def test_sphere_metrics_options_come_from_the_callback_signature():
    from normlab.methods.sphere.training import SphereMetricsCallback

    defaults = config.extensions()["sphere_metrics"].defaults
    signature = inspect.signature(SphereMetricsCallback).parameters
    assert defaults == {k: p.default for k, p in signature.items() if k != "params"}
