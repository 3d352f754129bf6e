"""Strict mode: a fallback to a non-fasttf path is never silent to the tests.

Every op that cannot run its kernel calls `fall_back(op, reason)` right before it takes the
plain-torch path. With FASTTF_STRICT=1 in the environment that raises `FallbackError`; without it,
it warns once per (op, reason).
"""

import os
import warnings

_warned: set[tuple[str, str]] = set()


class FallbackError(RuntimeError):
    """Raised under FASTTF_STRICT=1 when an op would leave its fasttf kernel."""


def strict_mode() -> bool:
    return os.environ.get("FASTTF_STRICT", "0").strip().lower() not in ("", "0", "false", "no")


def fall_back(op: str, reason: str) -> None:
    if strict_mode():
        raise FallbackError(f"fasttf.{op}: would fall back to plain torch because {reason} (FASTTF_STRICT=1)")
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fasttf.{op}: running plain torch because {reason}", stacklevel=3)
