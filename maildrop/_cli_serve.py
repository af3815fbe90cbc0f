"""The ``maildrop lmtp`` and ``maildrop smtp`` commands: options, start-up and signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._lmtp_retry import RetryMemory
from ._log import LineFormatter, LineHandler, install_direct
from ._quota import Quota
from ._supervisor import default_workers
from .cli import UsageError, parse_duration, parse_quota, parse_size

if TYPE_CHECKING:
    from ._listen import Listener
    from .lmtp import MaildirHandler, MaildirServer

#: The largest message the servers take by default (advertised as SIZE).
SERVER_MAX_SIZE = 32 * 1024 * 1024

log = logging.getLogger("maildrop")


def add_server_commands(sub: Any) -> None:
    """Add the ``lmtp`` and ``smtp`` subcommands to the ``maildrop`` parser's *sub*."""
    for name, proto in (("lmtp", "LMTP"), ("smtp", "SMTP")):
        s = sub.add_parser(
            name,
            help=f"serve {proto}, delivering into ROOT/<local-part>/ maildirs",
            description=f"Serve {proto} until SIGINT or SIGTERM, delivering each message "
            "into ROOT/<local-part>/ (which must exist; unknown recipients get 550 5.1.1). "
            "Replies only once a delivery is durable; logs one line per delivery to stderr. "
            "On SIGINT/SIGTERM it stops listening, finishes deliveries in flight and exits.",
            epilog=f"Example: maildrop {name} --listen 127.0.0.1:{24 if name == 'lmtp' else 2525}"
            " --root /srv/mail",
        )
        s.add_argument(
            "--listen",
            metavar="HOST:PORT",
            action="append",
            required=True,
            help="address to listen on: HOST:PORT, [IPv6]:PORT or unix:/path (repeatable; "
            "port 0 picks a free port; a live server's unix socket is never taken over)",
        )
        s.add_argument(
            "--root", metavar="DIR", required=True, help="directory of per-user maildirs"
        )
        s.add_argument(
            "--max-size",
            metavar="BYTES",
            type=parse_size,
            default=SERVER_MAX_SIZE,
            help="advertise SIZE and refuse larger messages with 552 5.3.4 (default 32M; "
            "messages stream to disk, memory does not grow with them)",
        )
        _add_delivery_options(s)
        s.add_argument("--hostname", help="name in the greeting (default: this host's FQDN)")
        s.add_argument(
            "--shutdown-timeout",
            metavar="DURATION",
            type=parse_duration,
            default=30.0,
            help="on shutdown, how long a message still being received may take (default 30s)",
        )
        s.add_argument(
            "--no-fsync", action="store_true", help="skip fsync (fast, NOT durable: tests only)"
        )
        _add_limits(s, smtp=name == "smtp")
        add_process_options(s)


def _add_delivery_options(s: argparse.ArgumentParser) -> None:
    """Add the options that shape what is stored to a server command's parser *s*."""
    s.add_argument(
        "--no-return-path", action="store_true", help="do not add a Return-Path: header"
    )
    s.add_argument(
        "--no-delivered-to", action="store_true", help="do not add a Delivered-To: header"
    )
    s.add_argument(
        "--separate-copies",
        action="store_true",
        help="give each recipient its own copy with its own Delivered-To: (default: "
        "write once, hard-link, and add Delivered-To: only for a single recipient)",
    )
    s.add_argument("--keep-crlf", action="store_true", help="store lines with CRLF as received")
    s.add_argument(
        "--recipient-delimiter",
        metavar="CHAR",
        default="+",
        help="deliver user+tag to user (default '+'; '' turns it off)",
    )


def _add_limits(s: argparse.ArgumentParser, *, smtp: bool) -> None:
    """Add the quota, connection and timeout options to a server command's parser *s*."""
    s.add_argument(
        "--quota",
        metavar="SIZE[,COUNT]",
        type=parse_quota,
        help="Maildir++ quota of every mailbox, e.g. 1G, 1G,10000 or 0,10000 (a count "
        "only; kept in its maildirsize); default: honour the limits of an existing "
        "maildirsize",
    )
    s.add_argument(
        "--quota-permanent",
        action="store_true",
        help="over quota is 552 5.2.2 (bounce) instead of 452 4.2.2 (retry later)",
    )
    s.add_argument(
        "--no-quota", action="store_true", help="ignore maildirsize files: no quota at all"
    )
    s.add_argument(
        "--max-connections",
        metavar="N",
        type=_positive,
        default=512,
        help="clients beyond N (per worker process) get 421 4.3.2 and are closed (default 512)",
    )
    s.add_argument(
        "--max-recipients",
        metavar="N",
        type=_positive,
        default=1000,
        help="RCPT beyond N in one transaction get 452 4.5.3 (default 1000)",
    )
    s.add_argument(
        "--timeout",
        metavar="DURATION",
        type=parse_duration,
        default=300.0,
        help="close a connection after this long without a command (default 300s; "
        "more than 100 commands without a message also end it)",
    )
    s.add_argument(
        "--data-timeout",
        metavar="DURATION",
        type=parse_duration,
        default=300.0,
        help="drop a message when no byte of it arrived for this long (default 300s)",
    )
    if smtp:
        s.add_argument(
            "--retry-memory",
            metavar="DURATION",
            type=parse_duration,
            default=24 * 3600.0,
            help="remember this long which recipients got a partly failed message (answered "
            "451), so the client's retry reaches only the others (default 24h; 0: off)",
        )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a positive integer")
    return int(text)


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of the server's process model to a server command's *parser*."""
    parser.add_argument(
        "--workers",
        metavar="N",
        type=parse_workers,
        help="worker processes, each with its own event loop, sharing the listening "
        f"sockets (default: two per CPU, {default_workers()} here); the parent restarts a "
        "worker that dies; 1 serves in this process, without a supervisor",
    )


def parse_workers(text: str) -> int:
    """Parse ``--workers``: a whole number, at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid worker count {text!r}: use a number >= 1")
    return int(text)


def run_server(args: argparse.Namespace) -> int:
    """Run the parsed ``lmtp``/``smtp`` command until a signal stops it; return its status."""
    from ._serve_proc import run_server as run

    return run(args)


def _announce(args: argparse.Namespace, addresses: Sequence[str], workers: int = 1) -> None:
    how = f" ({workers} workers)" if workers > 1 else ""
    for address in addresses:
        log.info(
            "maildrop %s on %s listening on %s, delivering into %s%s",
            args.command, args.hostname, address, args.root, how,
        )  # fmt: skip


def _setup_logging() -> Callable[[], None]:
    """Log maildrop's INFO lines (and asyncio's warnings) to stderr; return the undo."""
    ours, theirs = logging.getLogger("maildrop"), logging.getLogger("asyncio")
    if ours.handlers:
        return lambda: None
    handler: logging.Handler
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stderr (a test's capture)
        handler = logging.StreamHandler(sys.stderr)
    else:
        sys.stderr.flush()
        handler = LineHandler(fd)
        install_direct(handler)  # this process's logging is ours: no other handler to see
    # syslog's shape: time, host, program[pid].
    handler.setFormatter(LineFormatter(socket.gethostname()))
    saved = [(lg, lg.level, lg.propagate) for lg in (ours, theirs)]
    for lg, level in ((ours, logging.INFO), (theirs, logging.WARNING)):
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
    # A line per delivery: skip what the format never shows (the caller's frame, the
    # thread, the multiprocessing name), as the logging docs' "Optimization" section says.
    flags = (logging._srcfile, logging.logThreads, logging.logMultiprocessing)
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False

    def undo() -> None:
        install_direct(None)
        handler.close()  # writes what the last loop turn logged
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        logging._srcfile, logging.logThreads, logging.logMultiprocessing = flags

    return undo


async def _serve_until_signal(
    args: argparse.Namespace,
    ready: Callable[[list[str]], None] | None = None,
    *,
    listeners: Sequence[Listener] | None = None,
    lifeline: int | None = None,
    hard_stop: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; a second signal stops at once (deliveries cancelled).

    A supervised worker (*lifeline* given) treats every signal as the same graceful stop,
    and also stops when *lifeline* reads as end of file (its supervisor is gone); its
    supervisor escalates. *hard_stop* is called on a second signal, to bound the exit.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and lifeline is None and task is not None:
            log.warning("second signal: stopping now, cancelling deliveries in flight")
            if hard_stop is not None:
                hard_stop()
            task.cancel()
        stop.set()

    def orphaned(fd: int) -> None:
        loop.remove_reader(fd)
        log.warning("the supervisor is gone: stopping")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    if lifeline is not None:
        loop.add_reader(lifeline, orphaned, lifeline)
    try:
        return await serve(args, stop, ready, listeners)
    except asyncio.CancelledError:
        return 128 + signal.SIGINT
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if lifeline is not None:
            loop.remove_reader(lifeline)


async def serve(
    args: argparse.Namespace,
    stop: asyncio.Event,
    ready: Callable[[list[str]], None] | None = None,
    listeners: Sequence[Listener] | None = None,
) -> int:
    """Run the ``lmtp``/``smtp`` command described by *args* until *stop* is set.

    It serves on *listeners* (bound by the caller, who announces them and owns their
    cleanup), or else binds and logs ``args.listen`` itself.

    **Cancellation:** the server shuts down with no grace period: listeners and
    connections close, deliveries in flight finish or are cancelled (nothing partial stays
    in ``new/``).
    """
    from .lmtp import MaildirHandler, MaildirServer

    undo = _setup_logging()
    try:
        return await _serve(args, stop, ready, MaildirHandler, MaildirServer, listeners)
    finally:
        undo()


def _quota(args: argparse.Namespace) -> Quota | None:
    if args.no_quota:
        if args.quota is not None or args.quota_permanent:
            raise UsageError("--no-quota contradicts --quota and --quota-permanent")
        return None
    size, count = args.quota if args.quota is not None else (None, None)
    return Quota(size, count, permanent=args.quota_permanent)


async def _serve(
    args: argparse.Namespace,
    stop: asyncio.Event,
    ready: Callable[[list[str]], None] | None,
    handler_class: type[MaildirHandler],
    server_class: type[MaildirServer],
    listeners: Sequence[Listener] | None = None,
) -> int:
    root = args.root
    handler = handler_class(
        root,
        fsync=not args.no_fsync,
        max_size=args.max_size,
        quota=_quota(args),
        return_path=not args.no_return_path,
        delivered_to=not args.no_delivered_to,
        single_copy=not args.separate_copies,
        crlf_to_lf=not args.keep_crlf,
        recipient_delimiter=args.recipient_delimiter or None,
    )
    lmtp = args.command == "lmtp"
    server = server_class(
        handler,
        lmtp=lmtp,
        hostname=args.hostname,
        timeout=args.timeout,
        data_timeout=args.data_timeout,
        max_connections=args.max_connections,
        max_recipients=args.max_recipients,
        retry=None if lmtp or not args.retry_memory else RetryMemory(ttl=args.retry_memory),
    )
    try:
        if listeners is not None:
            addresses = [a for lsn in listeners for a in await server.listen_socket(lsn.sock)]
        else:
            addresses = [a for spec in args.listen for a in await server.listen(spec)]
            args.hostname = server.hostname  # looked up by listen() when not given
            _announce(args, addresses)
    except ValueError as exc:
        await server.shutdown(0)
        raise UsageError(str(exc)) from None
    except BaseException:
        await server.shutdown(0)
        raise
    if ready is not None:
        ready(addresses)
    try:
        await stop.wait()
    except BaseException:  # cancelled: stop serving without a grace period
        await server.shutdown(0)
        raise
    log.info("shutting down: finishing deliveries in flight")
    await server.shutdown(args.shutdown_timeout)
    log.info("stopped")
    return 0
