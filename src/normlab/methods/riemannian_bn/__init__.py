"""Riemannian batch normalization (Cho & Lee, NIPS 2017) in the pipeline.

* the algorithm: :class:`normlab.optim.SGDG`, :class:`normlab.optim.AdamG` (``optim/sgdg.py``,
  ``optim/adamg.py``) on the sphere maths of :mod:`normlab.geometry`;
* ``groups.py``: the paper's parameter groups, found by the scale-invariance probe
  (:func:`grassmann_param_groups`);
* ``optimizers.py``: ``optim=sgdg`` / ``optim=adamg``, the paper's policies and defaults;
* ``study.py``: the ``riemannian_bn`` study (SGD vs SGD-G vs Adam-G);
* tests: ``tests/test_sgdg.py``, ``test_adamg.py``, ``test_geometry.py``,
  ``test_riemannian_training.py``, ``test_riemannian_groups.py``,
  ``test_study_riemannian_bn.py``; the facts: ``shared/notes/riemannian_bn.md``.
"""


def register() -> None:
    """Add ``optim=sgdg``, ``optim=adamg`` and the ``riemannian_bn`` study to the registries."""
    from ...studies.base import register_study
    from ...train.optimizers import register_optimizer
    from .optimizers import ADAMG_SPEC, SGDG_SPEC

    register_optimizer(SGDG_SPEC, overwrite=True)
    register_optimizer(ADAMG_SPEC, overwrite=True)
    register_study(_study, name="riemannian_bn", lazy=True)


def _study():
    # imported on first use only: the study pulls in plotting
    from .study import RiemannianBNStudy

    return RiemannianBNStudy()
