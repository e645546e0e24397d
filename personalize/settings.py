"""Settings a server reads from its environment (`PERSONALIZE_...` variables)."""

from __future__ import annotations

import os

from personalize.errors import UserError


def whole_setting(name: str, default: int, environ=os.environ) -> int:
    """The environment variable `name` as a whole number of at least 1 (`1_000` allowed),
    `default` where it is unset or blank; a UserError naming the variable otherwise."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}: {text!r} is not a whole number") from None
    if value < 1:
        raise UserError(f"{name}: {text!r} must be at least 1")
    return value
