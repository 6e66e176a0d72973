"""Shared checks for the compat modules."""
from __future__ import annotations


def refuse(function: str, unsupported: dict) -> None:
    """Raise ValueError for the first option that is set to something rnnops does not support."""
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"{function}: {name}={value!r} is not supported by rnnops")
