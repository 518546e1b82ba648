"""Errors a user can act on: a bad config, data file, checkpoint or environment.

The command line prints these (and a missing file) as one line naming the culprit;
``--debug`` shows the traceback. Any other exception keeps its traceback, since it is a
bug to report. Each class also derives from the builtin error it refines, so code that
catches ``ValueError`` or ``KeyError`` keeps working.
"""

from __future__ import annotations


class CljaxError(Exception):
    """Base of the errors that the user's input or environment caused."""


class ConfigError(CljaxError, ValueError):
    """A config value (run field or method option) that is refused; names the key."""


class UnknownNameError(ConfigError, KeyError, AttributeError):
    """A config key, method, dataset or order that does not exist; lists the valid ones."""

    def __str__(self) -> str:
        # KeyError would print the repr of its argument (quotes around the sentence).
        return str(self.args[0]) if self.args else ""


class DataError(CljaxError, ValueError):
    """A benchmark or user data file with a missing or malformed field (names the file)."""


class CheckpointError(CljaxError, ValueError):
    """A checkpoint that does not fit the model or run (names the file or the leaf)."""


class ConfigChangedError(ConfigError):
    """A run directory holds a run of another config; resuming would mix the two."""


class RunLockedError(CljaxError, RuntimeError):
    """Another live process is writing the run directory."""


class StartupError(CljaxError, RuntimeError):
    """The processes of a multi-host run could not connect."""


class NonFiniteLossError(CljaxError, RuntimeError):
    """Training produced a NaN or inf loss; the run's last good checkpoint is kept."""
