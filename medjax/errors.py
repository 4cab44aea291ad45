"""Errors medjax raises for problems a user can fix; the launcher prints them without a traceback."""


class MedjaxError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(MedjaxError, ValueError):
    """A config key is unknown, missing or inconsistent, or a workdir belongs to another config."""


class DatasetNotFoundError(MedjaxError, FileNotFoundError):
    """A manually downloaded dataset is not where the config says (the message gives the layout)."""


class NonFiniteLossError(MedjaxError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
