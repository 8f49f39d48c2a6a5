"""Words for people: counts with their noun in the right number."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 route``, ``2 routes``, ``0 routes``; ``plural`` when adding an s is wrong."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
