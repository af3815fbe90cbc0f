"""The floor of any asyncio LMTP server: the same exchange, nothing parsed, nothing stored.

``python -m benchmarks._lmtp_floor PORT`` serves LMTP on 127.0.0.1:PORT with a bare
``asyncio.Protocol``: it answers every command line with a fixed reply, finds the end of the
data with one ``bytes.find`` per received buffer and answers ``250`` once per ``RCPT``,
without writing anything anywhere. What it costs per message (event-loop wake-ups, ``recv``
and ``send`` over loopback, one reply write per received buffer) is what a real server pays
before it parses, delivers or logs anything: ``benchmarks/lmtp.py --floor`` runs it as a
third contender so the CPU per message of ``maildrop lmtp`` can be read against it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

END = b"\r\n.\r\n"
REPLIES = {
    b"LHLO": b"250-floor\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
    b"DATA": b"354 2.0.0 Go ahead\r\n",
}
OK = b"250 2.0.0 OK\r\n"


class Floor(asyncio.Protocol):
    """One client: replies to command lines, swallows the data up to its final dot."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False
        self.rcpts = 0

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
                    buf = buf[-(len(END) - 1) :]  # the end may straddle two buffers
                    break
                buf, self.in_data = buf[end + len(END) :], False
                out.append(OK * self.rcpts)
                self.rcpts = 0
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            verb = buf[:4].upper()
            buf = buf[eol + 2 :]
            out.append(REPLIES.get(verb, OK))
            self.rcpts += verb == b"RCPT"
            if verb == b"DATA":
                self.in_data, buf = True, b"\r\n" + buf  # the first line may be "."
        self.buf = buf
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:*port* until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(Floor, "127.0.0.1", port)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
