"""What the rules refuse: an error that carries its admin API answer."""

from __future__ import annotations


class Refused(Exception):
    """A change or command the rules refuse; ``status`` and ``code`` are for the admin
    API (the message is the answer's ``message``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
