"""One package per method: what each method needs beyond its core algorithm.

=================  =====================================================================
package            holds
=================  =====================================================================
``riemannian_bn``  SGD-G / Adam-G in the pipeline (``optim=sgdg|adamg``): the paper's
                   parameter groups, defaults and the ``riemannian_bn`` study
``enorm``          ENorm in the pipeline (the ``enorm`` extension), the paper's FC-15 and
                   fully convolutional models, the ``enorm`` study
``sphere``         SphereSGD in the pipeline (``optim=sphere``), the SI model zoo, the
                   ``sphere_metrics`` extension and the ``sphere_regimes`` study
``norm_layers``    batch renormalization and group norm against BN: the ``batch_size`` study
=================  =====================================================================

The core algorithms stay in :mod:`normlab.optim`, :mod:`normlab.enorm`, :mod:`normlab.nn` and
:mod:`normlab.geometry`. Each package exposes ``register()``, which :mod:`normlab.registry` calls
the first time a name is looked up; the packages' ``__init__`` modules import nothing heavy.
"""
