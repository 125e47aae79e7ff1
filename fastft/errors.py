"""The one exception type for errors a user can cause.

Every check that a caller can fail (a bad shape, a wrong dtype, a bad config
value, a broken data file) raises :class:`FastftError` with a message that
names what was wrong and how to fix it. The command line prints the message
alone and exits non-zero.
"""

from __future__ import annotations


class FastftError(Exception):
    """A problem with the caller's input, configuration or environment."""


def check(cond: bool, message: str) -> None:
    """Raise :class:`FastftError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise FastftError(message)
