"""Pydantic validation errors as one line a user can act on: ``field.path: what is wrong; ...``."""

from __future__ import annotations

from pydantic import ValidationError


def explain(exc: ValidationError, root: str = "") -> str:
    """Each error as ``loc: message`` (``root`` names a whole-object error); "missing (required)" and
    "unknown field" instead of pydantic's wording, which names neither the rule nor the fix."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or root
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing (required)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(parts)
