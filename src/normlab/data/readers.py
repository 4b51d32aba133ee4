"""Readers for the dataset files a user downloads; normlab never downloads: point ``data.root`` at
the files you have.

* MNIST (IDX files): :mod:`normlab.data.mnist`
* CIFAR-10/100 (python pickles, folder or ``.tar.gz``): :mod:`normlab.data.cifar`
* SVHN (cropped digits, ``.mat``): :mod:`normlab.data.svhn`

Every reader refuses a damaged or wrong file with a :class:`~normlab.errors.DataError` that names
the file and the fix (see :mod:`normlab.data.files`), never loads silently wrong data.
"""

from __future__ import annotations

from .cifar import CIFAR_HELP, load_cifar
from .files import existing_root
from .mnist import MNIST_FILES, MNIST_HELP, load_mnist, read_idx
from .svhn import SVHN_FILES, SVHN_HELP, load_svhn, read_svhn_mat

__all__ = [
    "CIFAR_HELP",
    "MNIST_FILES",
    "MNIST_HELP",
    "SVHN_FILES",
    "SVHN_HELP",
    "existing_root",
    "load_cifar",
    "load_mnist",
    "load_svhn",
    "read_idx",
    "read_svhn_mat",
]
