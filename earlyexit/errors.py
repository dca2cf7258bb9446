"""User-facing errors.

Everything that is the user's fault (a bad path, a bad config, a bad prompt, a bad sampling
value) raises a subclass of :class:`EarlyExitError` with a one-line message that names the
thing at fault. The CLI prints that line and exits non-zero; it never shows a traceback for
these. Anything else escaping is a bug in earlyexit.
"""

from __future__ import annotations


class EarlyExitError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(EarlyExitError, ValueError):
    """A model or run configuration is invalid (wrong type, unknown key, impossible shape)."""


class CheckpointError(EarlyExitError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unsupported kind."""


class InputError(EarlyExitError, ValueError):
    """A prompt or a generation parameter is invalid (empty, too long, out of range)."""


class DeviceError(EarlyExitError):
    """The requested device or dtype is not available here."""


class TrainingError(EarlyExitError):
    """Training cannot go on (non-finite loss, incompatible resume)."""
