"""The error types for problems a user can act on.

Raise :class:`UserError` (or a subclass) when the input is wrong: an option out of
range, a missing dataset, a checkpoint that does not fit. The command line prints its
message as one line (what was wrong, what to do) without a traceback. Anything else is
a bug and keeps its traceback.

``user_message(err)`` words an error for the command line, environment faults (full
disk, read-only folder) included, and returns None for a bug.

The subclasses also derive from the built-in type a caller would expect
(``ValueError``, ``TypeError``, ``FileNotFoundError``), so ``except ValueError`` in
library code keeps working.
"""

from __future__ import annotations

import errno

__all__ = ["UserError", "ConfigError", "UnsupportedModel", "WeightsNotFound", "user_message"]


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message says which and what to do."""


class UnsupportedModel(UserError, TypeError):
    """A model of a family SAR cannot rewire; the message lists the supported families."""


class WeightsNotFound(UserError, FileNotFoundError):
    """No weights file where one was asked for; the message lists the places looked at."""


# --- environment faults, worded for the command line ------------------------------------------------

# what torch.save and safetensors say when a write fails (the disk is full, most of the time)
_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed", "file write failed", "unexpected pos")
_DISK_FULL = ("No space left", "StorageFull", "code: 28")


def user_message(err: BaseException) -> str | None:
    """The one line to print for an error the user can act on; None for a bug (keep the traceback).

    ``UserError`` speaks for itself. Environment faults get a line naming the path: a
    full disk (``ENOSPC``, and torch's or safetensors' failed writes), a read-only file
    system, a missing permission, a path through a regular file.
    """
    if isinstance(err, UserError):
        return _own_words(err)
    path = _path_being_written(err)
    if _disk_full(err):
        where = f" while writing {path}" if path else ""
        return f"no space left on device{where}: free space and `--resume auto`"
    if isinstance(err, OSError) and err.filename is not None and (
        isinstance(err, (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError))
        or err.errno == errno.EROFS
    ):
        return (f"{err.strerror or type(err).__name__}: {err.filename}; check that path "
                "(--output must be a folder this user can write, on a writable file system)")
    return None


def _own_words(err: BaseException) -> str:
    """The error's own words; a DataLoader worker's re-raised error carries a traceback
    in its message, of which only the last line is the error."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or while handling."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _disk_full(err: BaseException) -> bool:
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if type(e).__name__ == "SafetensorError" and any(s in text for s in _DISK_FULL):
            return True
        if isinstance(e, RuntimeError) and any(s in text for s in _WRITE_FAILURES):
            return True
    return False


def _path_being_written(err: BaseException) -> str | None:
    """The file ``sarvit.checkpoint.atomic_write`` was writing when ``err`` rose, else
    the file the ``OSError`` names."""
    for e in _chain(err):
        tb, path = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "atomic_write":
                path = tb.tb_frame.f_locals.get("path", path)
            tb = tb.tb_next
        if path is not None:
            return str(path)
    named = next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None)
    return None if named is None else str(named)
