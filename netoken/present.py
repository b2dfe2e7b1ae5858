"""How netoken's results read for people.

The library returns documents (dicts that `--json` prints as they are);
this module turns them into the lines the CLI prints.  It imports nothing
that loads libbpf, so it serves the verbs that need no kernel too.
"""

from __future__ import annotations

from . import state
from .errors import BPFError, NetokenError


def one_line(text: str) -> str:
    return " ".join(text.split("\n")[0].split()) if text else text


def error_line(e: Exception) -> str:
    """E as the one line a user sees (`netoken: LINE`, or {"error": LINE})."""
    # State directories are used through their fds; say which path they are.
    return state.shown(_error_text(e))


def _error_text(e: Exception) -> str:
    if isinstance(e, NetokenError):
        return one_line(str(e))
    if isinstance(e, BPFError):
        return e.user_message()
    if isinstance(e, FileNotFoundError) and e.filename is None:
        return one_line(str(e))  # ours: object file or namespace missing
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return f"internal error: {type(e).__name__}: {one_line(str(e))} (--debug for a traceback)"
