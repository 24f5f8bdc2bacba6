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


def check_int(name: str, value, minimum: int, example=None) -> int:
    """``value`` as an int if it is a whole number >= ``minimum``; otherwise an EnpcgError naming ``name``."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EnpcgError(f"{name} must be an integer >= {minimum}; you supplied {value!r}. Fix: pass "
                         f"{'e.g. ' + str(example) if example is not None else f'a whole number of at least {minimum}'}")
    return int(value)


def check_positive(name: str, value, unit_name: str, example=None) -> float:
    """``value`` as a float if it is finite and > 0 (in ``unit_name``); otherwise an EnpcgError naming ``name``."""
    import math

    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v <= 0:
        raise EnpcgError(f"{name} must be a positive finite number in {unit_name}; you supplied {value!r}. Fix: "
                         f"pass {'e.g. ' + str(example) if example is not None else 'a number > 0'}")
    return v
