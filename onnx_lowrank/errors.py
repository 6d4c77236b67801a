"""Exceptions the command line turns into exit codes.

`InputError` is bad input or usage (exit 2, one line on stderr); `BoundError` is a result that
failed a bound the user asked for (exit 1). Anything else escaping the library is a bug.
"""

__all__ = ["BoundError", "InputError"]


class InputError(Exception):
    """Bad input or usage: the message is one line that says what was expected and what was found."""


class BoundError(Exception):
    """The result failed a bound the user requested (error, fidelity, speed-up)."""
