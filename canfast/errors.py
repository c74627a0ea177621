"""Errors that the command line turns into exit codes."""


class BadInput(ValueError):
    """Input the user can fix: a wrong name, a missing file, a malformed line, a value out of
    range. The CLI prints its message as one line and exits with code 2."""


class CanfastWarning(UserWarning):
    """Something the user should know about a result that still stands: a skipped step, an
    ignored key, a criterion that cannot be reached. The CLI prints it as one line."""


def warn(message: str) -> None:
    """Warn once per message and call site (Python's default filter keeps repeats quiet)."""
    import warnings

    warnings.warn(message, CanfastWarning, stacklevel=2)
