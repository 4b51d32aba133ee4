#!/usr/bin/env bash
# Install what normlab needs, only what is missing. Used by `make run`, `make test` and CI.
#   - torch: the CPU build torch==2.13.0 when no torch is installed (a bare `pip install torch`
#     would pull a multi-GB CUDA build); an installed torch >= 2.3 is kept as it is.
#   - normlab itself (editable) with its test extra.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "ensure_deps: installing the CPU build of torch (torch==2.13.0)"
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi

# Every distribution that pyproject.toml names (dependencies and the test extra) must be installed,
# and `normlab` must be this checkout (editable); anything else reinstalls. The list is read from
# pyproject.toml, so a new dependency can never be missed by a hand-kept list here.
if ! "$PYTHON" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, pathlib, re, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    md.version(re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0])
import normlab
assert pathlib.Path(normlab.__file__).resolve().is_relative_to(pathlib.Path("src").resolve())
PY
then
  echo "ensure_deps: installing normlab (editable) with its test extra"
  "$PYTHON" -m pip install -q -e ".[test]"
fi
