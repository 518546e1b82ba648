"""Errors a user can act on: a bad config, data file, checkpoint or environment.

The command line prints these as one line naming the culprit (``--debug`` shows the
traceback); any other exception keeps its traceback, since it is a bug to report.
"""

from __future__ import annotations


class CljaxError(Exception):
    """Base of the errors that the user's input or environment caused."""


class ConfigChangedError(CljaxError, ValueError):
    """A run directory holds a run of another config; resuming would mix the two."""


class RunLockedError(CljaxError, RuntimeError):
    """Another live process is writing the run directory."""


class StartupError(CljaxError, RuntimeError):
    """The processes of a multi-host run could not connect."""


class NonFiniteLossError(CljaxError, RuntimeError):
    """Training produced a NaN or inf loss; the run's last good checkpoint is kept."""
