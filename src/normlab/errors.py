"""Errors that are the user's to fix. The CLI prints them as one line (exit status 2), no traceback.

Components (optimizers, layers, model builders) raise plain ``ValueError`` for bad arguments, as
``torch.optim`` and ``torch.nn`` do. Where the pipeline builds them from a config,
:func:`config_errors` turns those into :class:`ConfigError` naming the config section to fix, so
every bad value reaches the user through one path.
"""

from __future__ import annotations

import contextlib


class UserError(ValueError):
    """Bad input: a message that names the problem and the fix."""


class DataError(UserError):
    """A data file is missing, unreadable or not in the expected format."""


class ConfigError(UserError):
    """An unknown configuration key or an invalid value."""


@contextlib.contextmanager
def config_errors(section: str, fix: str):
    """Re-raise a ``ValueError`` from building ``section`` as a :class:`ConfigError`.

    Only the construction of a component belongs in this block (a constructor's ``ValueError`` is
    about its arguments, which come from the config); errors during training are not the config's.

    Args:
        section: the config section the component was built from (``"model"``, ``"optim"``).
        fix: what the user can do, e.g. ``"see `normlab list models`"``.
    """
    try:
        yield
    except UserError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{section}: {exc} ({fix})") from exc
