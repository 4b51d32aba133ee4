"""normlab: normalization and scale-invariant training for PyTorch.

The parts, each usable alone:

* :mod:`normlab.optim`: SGD-G / Adam-G (Riemannian batch normalization), SphereSGD (fixed
  effective learning rate on the sphere);
* :mod:`normlab.nn`: batch renormalization, group-norm helpers, synced norms, converters;
* :class:`normlab.ENorm`: equi-normalization of ReLU networks;
* :mod:`normlab.geometry`, :mod:`normlab.scale_invariance`: sphere maths and detection of
  scale-invariant weights;
* :mod:`normlab.data`, :mod:`normlab.models`, :mod:`normlab.train`: the pipeline the studies
  (:mod:`normlab.studies`) and the ``normlab`` command run on.
"""

import importlib.metadata as _md

try:
    __version__ = _md.version("normlab")
except _md.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Light on purpose: the training pipeline loads no method, data reader, plotting or study until a
# name is looked up (see normlab.registry), so ``import normlab.optim`` costs little over torch.
from .config import resolve as resolve_config  # noqa: E402
from .enorm import ENorm  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["ENorm", "__version__", "resolve_config", "train"]
