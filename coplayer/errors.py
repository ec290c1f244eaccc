"""Errors a user can act on.

Each class also inherits a built-in exception, so callers that do not know
coplayer can still catch ``ValueError`` or ``OSError`` (python-rtmidi style).
The CLI prints ``str(error)`` as one line; ``--verbose`` adds the traceback.
"""


class CoplayerError(Exception):
    """Base class of every error coplayer reports to its user."""


class ConfigError(CoplayerError, ValueError):
    """The configuration file or a command-line override is invalid."""


class MidiFileError(CoplayerError, ValueError):
    """A MIDI file cannot be read or written."""


class ModelError(CoplayerError, ValueError):
    """A model file or its model card is missing, corrupt or does not match."""


class DataError(CoplayerError, ValueError):
    """A corpus or split manifest cannot be loaded."""


class PortNotFoundError(CoplayerError, OSError):
    """A named MIDI port does not exist."""


class MissingExtraError(CoplayerError, ImportError):
    """A command needs an optional dependency that is not installed."""


class SessionError(CoplayerError, OSError):
    """The session folder or a session file cannot be written."""


def one_line(error: BaseException) -> str:
    """A library's exception as one line: its text, or its class name when the
    text is empty (mido's EOFError, zipfile's errors) or only a key."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError):
        return f"no entry {text}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
