"""Errors a user can cause and fix; the CLI prints their message without a traceback."""


class LmforgeError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class DataError(LmforgeError, ValueError):
    """Bad input data: the message names the file and line."""


class ConfigError(LmforgeError, ValueError):
    """A bad config file or override: the message names the key and the fix."""


class CheckpointError(LmforgeError):
    """A missing or corrupt checkpoint: the message names the file."""


class TrainingError(LmforgeError):
    """Training cannot go on (e.g. a NaN loss): the message names the step."""


class DiskFullError(LmforgeError):
    """The disk filled up during a write: the message names the directory, the bytes needed and what was kept."""


def one_line(text: object) -> str:
    """`text` (say, a library's exception) with line breaks and runs of spaces collapsed: every message is one line."""
    return " ".join(str(text).split())
