"""Sans-IO newline framing with a hard cap on line length."""

from __future__ import annotations

MAX_LINE = 1024 * 1024  # the contract: a line over 1 MiB is an error


class LineTooLong(Exception):
    pass


class LineBuffer:
    """Feed bytes in, get complete lines (without the newline) out."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        start = len(self._buf)
        self._buf += data
        lines: list[bytes] = []
        cut = 0
        pos = self._buf.find(b"\n", start)
        while pos >= 0:
            if pos - cut > self._max:
                raise LineTooLong
            lines.append(bytes(self._buf[cut:pos]))
            cut = pos + 1
            pos = self._buf.find(b"\n", cut)
        if cut:
            del self._buf[:cut]
        if len(self._buf) > self._max:
            raise LineTooLong
        return lines

    @property
    def pending(self) -> int:
        """Bytes held that do not yet end in a newline."""
        return len(self._buf)
