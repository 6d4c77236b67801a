"""The error taxonomy: each exception the library raises maps to one exit code of the CLI.

- `InputError`: bad input or usage (exit 2): a one-line message that says what was expected
  and what was found, no traceback.
- `BoundError`: the result failed a bound the user asked for (exit 1).
- `InternalError`: a failure that is the tool's own, such as onnxruntime refusing or failing on
  a model the tool produced (exit 3): a one-line message, the traceback under `--debug`.
  Any other exception escaping the library is a bug and exits 3 the same way.
"""

__all__ = ["BoundError", "InputError", "InternalError"]


class InputError(Exception):
    """Bad input or usage: the message is one line that says what was expected and what was found."""


class BoundError(Exception):
    """The result failed a bound the user requested (error, fidelity, speed-up); `result`, when
    set, is the result that failed it (already saved), for the caller to show."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class InternalError(Exception):
    """The tool failed on its own work (e.g. onnxruntime cannot run a model the tool wrote)."""

