"""User-facing errors: one clear line, a non-zero exit, never a bare traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class SegdistError(Exception):
    """A mistake in the user's input (a file, a config value, a flag).

    The message is one line that names the file or value and the problem.
    """


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(): SegdistError becomes `segdist: <message>` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except SegdistError as err:
            print(f"segdist: error: {err}", file=sys.stderr)
            return 2

    return wrapper
