"""User-facing errors.

Every error raised on bad user input is an :class:`EnpcgError`. Its message names the file (where there is
one), the field, what was received, what is allowed, and the fix. The command line prints the message and
exits with status 2 instead of a traceback.
"""


class EnpcgError(ValueError):
    """Bad input or an impossible request; the message says what and how to fix it."""


def input_error(what: str, *, path=None, field=None, fix=None) -> EnpcgError:
    """Build an :class:`EnpcgError` whose message reads ``path: field: what. Fix: fix``."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if field is not None:
        parts.append(str(field))
    msg = ": ".join(parts + [what]) if parts else what
    if fix:
        msg += f". Fix: {fix}"
    return EnpcgError(msg)
