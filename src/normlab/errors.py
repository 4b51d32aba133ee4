"""Errors that are the user's to fix. The CLI prints them without a traceback."""


class UserError(ValueError):
    """Bad input: a message that names the problem and the fix."""


class DataError(UserError):
    """A data file is missing, unreadable or not in the expected format."""


class ConfigError(UserError):
    """An unknown configuration key or an invalid value."""
