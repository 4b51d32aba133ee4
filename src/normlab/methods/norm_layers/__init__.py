"""Group normalization and batch renormalization against batch normalization across batch sizes
(Wu & He 2018; Ioffe 2017; the mcnGroupNorm MNIST experiment).

* the layers: :mod:`normlab.nn` (``BatchRenorm1d/2d/3d``, the synced norms, the norm factory
  ``model.norm=bn|gn|brn|ln``, converters);
* ``study.py``: the ``batch_size`` study (LeNet, batch sizes 256 down to 1);
* tests: ``tests/test_batch_renorm.py``, ``test_sync_norm.py``, ``test_norm_factory.py``,
  ``test_convert.py``, ``test_study_batch_size.py``; the facts: ``shared/notes/norm_layers.md``.
"""


def register() -> None:
    """Add the ``batch_size`` study (the layers themselves are core: ``normlab.nn``)."""
    from ...studies.base import register_study

    register_study(_study, name="batch_size", lazy=True)


def _study():
    # imported on first use only: the study pulls in plotting
    from .study import BatchSizeStudy

    return BatchSizeStudy()
