"""Quoting a user's values in error messages, and hints.

Values quoted in a message go through `shown`, which never prints more than ~80 characters of them (a value
may be huge: a whole file, or an alias that expands to millions of nodes), in time bounded by that limit.
An error may carry a `hint` (`with_hint`); the CLI prints it on a second line, ``hint: ...``.
"""

from __future__ import annotations

import reprlib

SHOWN_CHARS = 80  # the most characters of a user's value a message quotes

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 3, 4, 6, 6, 6
_repr.maxstring = _repr.maxother = _repr.maxlong = SHOWN_CHARS


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to `limit` characters."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clipped(text: str, limit: int = 2 * SHOWN_CHARS) -> str:
    """`text` on one line (runs of whitespace made one space), cut to `limit` characters."""
    text = " ".join(str(text)[:4 * limit].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def with_hint(err: BaseException, hint: str) -> BaseException:
    """`err` with a `hint` the CLI prints below the error (e.g. the flag or file that would fix it)."""
    err.hint = hint
    return err
