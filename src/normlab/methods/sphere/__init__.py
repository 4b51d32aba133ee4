"""Training on the sphere at a fixed effective learning rate (Kodryan et al., NeurIPS 2022).

* the algorithm: :class:`normlab.optim.SphereSGD` (``optim/sphere.py``) on the sphere maths of
  :mod:`normlab.geometry`; the metrics :mod:`normlab.sphere_metrics`; the regime classifier
  :mod:`normlab.regimes`; the SI models :mod:`normlab.models.scale_invariant`;
* ``groups.py``: the scale-invariant parameter groups by granularity
  (:func:`scale_invariant_param_groups`);
* ``training.py``: ``optim=sphere`` (the SI group on one sphere, the rest Euclidean) and the
  ``sphere_metrics`` extension;
* ``study.py``: the ``sphere_regimes`` study;
* tests: ``tests/test_sphere_sgd.py``, ``test_sphere_metrics.py``, ``test_regimes.py``,
  ``test_si_models.py``, ``test_sphere_training.py``, ``test_sphere_groups.py``,
  ``test_study_sphere_regimes.py``; the facts: ``shared/notes/sphere_regimes.md``.
"""


def register() -> None:
    """Add ``optim=sphere``, the SI models, ``sphere_metrics`` and the ``sphere_regimes`` study."""
    from ... import config
    from ...models import register_model
    from ...models.scale_invariant import SCALE_INVARIANT_MODELS
    from ...studies.base import register_study
    from ...train.optimizers import register_optimizer
    from .training import SPHERE_METRICS_EXTENSION, SPHERE_SPEC

    for name, cls in SCALE_INVARIANT_MODELS.items():
        register_model(name, cls, overwrite=True)
    register_optimizer(SPHERE_SPEC, overwrite=True)
    config.register_extension(SPHERE_METRICS_EXTENSION, overwrite=True)
    register_study(_study, name="sphere_regimes", lazy=True)


def _study():
    # imported on first use only: the study pulls in plotting
    from .study import SphereRegimesStudy

    return SphereRegimesStudy()
