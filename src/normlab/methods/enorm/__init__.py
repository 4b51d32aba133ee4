"""Equi-normalization (Stock et al., ICLR 2019) in the pipeline.

* the algorithm: :class:`normlab.ENorm` (``normlab/enorm/``: rescaling groups from the model's
  graph, the balancing cycles, optimizer-state rescaling);
* ``callback.py``: the ``enorm`` extension (one ENorm cycle after each optimizer step) and its
  metrics; the paper's models ``fully_connected`` (FC-15) and ``fully_conv``;
* ``study.py``: the ``enorm`` study;
* tests: ``tests/test_enorm*.py``, ``test_study_enorm.py``; the facts: ``shared/notes/enorm.md``.
"""


def register() -> None:
    """Add the ``enorm`` extension, the paper's two models and the ``enorm`` study."""
    from ... import config
    from ...models import register_model
    from ...models.fully_conv import FullyConv, fully_connected
    from ...studies.base import register_study
    from .callback import ENORM_EXTENSION

    register_model("fully_connected", fully_connected, overwrite=True)
    register_model("fully_conv", FullyConv, overwrite=True)
    config.register_extension(ENORM_EXTENSION, overwrite=True)
    register_study(_study, name="enorm", lazy=True)


def _study():
    # imported on first use only: the study pulls in plotting
    from .study import ENormStudy

    return ENormStudy()
