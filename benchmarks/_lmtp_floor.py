"""The floor of any asyncio LMTP server: the same exchange, nothing parsed, nothing stored.

``python -m benchmarks._lmtp_floor PORT [ROOT]`` serves LMTP on 127.0.0.1:PORT with a bare
``asyncio.Protocol``: it answers every command line with a fixed reply, finds the end of the
data with one ``bytes.find`` per received buffer and answers ``250`` once per ``RCPT``.
Without ROOT it stores nothing: what it costs per message (event-loop wake-ups, ``recv``
and ``send`` over loopback, one reply write per received buffer) is what a real server pays
before it parses, delivers or logs anything. With ROOT it also stores each message the raw
durable way, on the loop's own thread and one at a time (create in ``ROOT/<user>/tmp``,
write with LF line ends, fsync, link into ``new/``, unlink, fsync ``new/``): the exchange
plus the kernel's work for a durable file, with no engine around it. ``benchmarks/lmtp.py
--floor`` runs both as contenders so the CPU per message of ``maildrop lmtp`` can be read
against them (their msg/s mean nothing: the stored floor blocks its loop on every fsync).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys

END = b"\r\n.\r\n"
REPLIES = {
    b"LHLO": b"250-floor\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
    b"DATA": b"354 2.0.0 Go ahead\r\n",
}
OK = b"250 2.0.0 OK\r\n"
_names = itertools.count()


def store(root: str, user: str, message: bytes) -> None:
    """Deliver *message* into ROOT/*user* with the raw durable steps (no engine)."""
    md = os.path.join(root, user)
    name = f"{next(_names)}.P{os.getpid()}.floor"
    tmp, new = os.path.join(md, "tmp", name), os.path.join(md, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, message.replace(b"\r\n", b"\n"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, new)
    os.unlink(tmp)
    dfd = os.open(os.path.join(md, "new"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Floor(asyncio.Protocol):
    """One client: replies to command lines, swallows the data up to its final dot."""

    def __init__(self, root: str | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.root = root
        self.buf = b""
        self.in_data = False
        self.rcpts = 0
        self.user = ""
        self.message: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 floor LMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        buf, out = self.buf + data, []
        while buf:
            if self.in_data:
                end = buf.find(END)
                if end < 0:
                    keep = len(END) - 1  # the end may straddle two buffers
                    self.message.append(buf[:-keep])
                    buf = buf[-keep:]
                    break
                self.message.append(buf[: end + 2])
                buf, self.in_data = buf[end + len(END) :], False
                if self.root is not None:
                    store(self.root, self.user, b"".join(self.message)[2:])
                self.message = []
                out.append(OK * self.rcpts)
                self.rcpts = 0
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            verb = buf[:4].upper()
            if verb == b"RCPT":
                self.user = buf[9:eol].split(b"@")[0].decode()  # RCPT TO:<user@domain>
            buf = buf[eol + 2 :]
            out.append(REPLIES.get(verb, OK))
            self.rcpts += verb == b"RCPT"
            if verb == b"DATA":
                self.in_data, buf = True, b"\r\n" + buf  # the first line may be "."
        self.buf = buf
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int, root: str | None) -> None:
    """Serve on 127.0.0.1:*port* (storing under *root* if given) until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(lambda: Floor(root), "127.0.0.1", port)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
