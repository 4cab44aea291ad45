"""Errors medjax raises for problems a user can fix; every command prints them as one ``medjax: error:``
paragraph without a traceback (:func:`medjax.cli.run`)."""


class MedjaxError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(MedjaxError, ValueError):
    """A config key is unknown, missing, out of range or inconsistent, or a workdir belongs to another
    config. The message names the key."""


class DatasetNotFoundError(MedjaxError, FileNotFoundError):
    """A manually downloaded dataset is not where the config says (the message gives the layout)."""


class DataError(MedjaxError, ValueError):
    """Source files of a dataset or of a prediction cannot be used; the message names the file."""


class NonFiniteLossError(MedjaxError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class NonFiniteOutputError(MedjaxError, FloatingPointError):
    """A model produced NaN or infinite outputs (typically a corrupt checkpoint); nothing was written."""


class CheckpointError(MedjaxError, OSError):
    """A checkpoint or run file is unreadable; the message names the file."""


class BusyError(MedjaxError, RuntimeError):
    """Another process holds the workdir or is preparing the dataset; the message names it."""
