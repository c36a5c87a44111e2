"""Renamed keywords: the old name keeps working for a while, with a ``DeprecationWarning`` naming the new one."""

from __future__ import annotations

import warnings
from typing import Any


def renamed(where: str, old: str, old_value: Any, new: str, new_value: Any, *, stacklevel: int = 3) -> Any:
    """The value of keyword ``new`` for a call that may still pass its deprecated name ``old`` (``None`` = not
    passed): ``old_value`` with a ``DeprecationWarning`` when only the old name is given, else ``new_value``.
    Passing both is a ``TypeError``. ``stacklevel`` points the warning at the caller of ``where``."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{where}: {old} is the deprecated name of {new}; pass {new} only")
    warnings.warn(f"{where}: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=stacklevel)
    return old_value
