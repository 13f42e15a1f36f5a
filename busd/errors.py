"""The contract's error reasons and the one exception that carries them."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    INBOX_FULL = "inbox_full"
    UNAVAILABLE = "unavailable"


class BusError(Exception):
    """A refusal the client is told about. ``data`` holds extra reply members
    (for example ``retry_after``)."""

    def __init__(self, reason: Reason, message: str, **data: object) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.data = data

    def __repr__(self) -> str:
        return f"BusError({self.reason.value!r}, {self.message!r})"
