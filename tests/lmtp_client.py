"""A raw LMTP/SMTP client for tests: reads every reply, one per recipient after DATA.

``smtplib.LMTP.sendmail`` reads a single reply after DATA, so per-recipient replies (RFC
2033) need this. It speaks on asyncio streams so tests need no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Transcript:
    """The replies of one transaction."""

    mail: str = ""
    rcpt: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        """How many recipients were accepted."""
        return sum(r.startswith("2") for r in self.rcpt)


def wire(message: bytes) -> bytes:
    """Return *message* as DATA sends it: CRLF line endings, dot-stuffed, then ``.``."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


class Client:
    """One LMTP (or SMTP) connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, lmtp: bool = True
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.lmtp = lmtp

    @classmethod
    async def connect(cls, port: int | str, *, lmtp: bool = True) -> Client:
        """Connect to 127.0.0.1:*port* (or a Unix socket path), read the greeting, LHLO."""
        if isinstance(port, str):
            reader, writer = await asyncio.open_unix_connection(port)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer, lmtp=lmtp)
        greeting = await self.reply()
        assert greeting.startswith("220"), greeting
        hello = await self.command(f"{'LHLO' if lmtp else 'EHLO'} client.test")
        assert hello.startswith("250"), hello
        return self

    async def reply(self) -> str:
        """Read one (possibly multi-line) reply; return its last line."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 20)
            if not line:
                raise ConnectionError("server closed the connection")
            text = line.decode().rstrip("\r\n")
            if len(text) < 4 or text[3] != "-":
                return text

    async def command(self, line: str) -> str:
        """Send one command line and return its reply."""
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, sender: str, rcpts: list[str], message: bytes) -> Transcript:
        """Run one transaction; after DATA read one reply per accepted recipient (LMTP)
        or one in all (SMTP)."""
        t = Transcript()
        t.mail = await self.command(f"MAIL FROM:<{sender}>")
        for r in rcpts:
            t.rcpt.append(await self.command(f"RCPT TO:<{r}>"))
        if not t.accepted:
            return t
        go = await self.command("DATA")
        assert go.startswith("354"), go
        self.writer.write(wire(message))
        await self.writer.drain()
        for _ in range(t.accepted if self.lmtp else 1):
            t.data.append(await self.reply())
        return t

    async def close(self) -> None:
        """Close the connection without QUIT."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def quit(self) -> None:
        """Say QUIT and close."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.command("QUIT")
        await self.close()
