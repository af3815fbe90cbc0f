"""The ``maildrop lmtp`` and ``maildrop smtp`` commands: options, start-up and signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._supervisor import cpu_count
from .cli import UsageError, _say, parse_duration, parse_size

if TYPE_CHECKING:
    from ._listen import Listener
    from .lmtp import MaildirHandler, MaildirServer

EX_UNAVAILABLE = 69
#: The largest message the servers take by default (aiosmtpd holds it in memory).
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
            help="refuse larger messages with 552 5.3.4 (default 32M; messages are held "
            "in memory while received)",
        )
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
        s.add_argument(
            "--keep-crlf", action="store_true", help="store lines with CRLF as received"
        )
        s.add_argument(
            "--recipient-delimiter",
            metavar="CHAR",
            default="+",
            help="deliver user+tag to user (default '+'; '' turns it off)",
        )
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
        add_process_options(s)


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of the server's process model to a server command's *parser*."""
    parser.add_argument(
        "--workers",
        metavar="N",
        type=parse_workers,
        help="worker processes, each with its own event loop, sharing the listening "
        f"sockets (default: one per CPU, {cpu_count()} here); the parent restarts a "
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
        log.info("%s listening on %s, delivering into %s%s", args.command, address, args.root, how)


def _setup_logging() -> Callable[[], None]:
    """Log maildrop's INFO lines (and aiosmtpd's warnings) to stderr; return the undo."""
    ours, theirs = logging.getLogger("maildrop"), logging.getLogger("mail.log")
    if ours.handlers:
        return lambda: None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    saved = [(lg, lg.level, lg.propagate) for lg in (ours, theirs)]
    for lg, level in ((ours, logging.INFO), (theirs, logging.WARNING)):
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False

    def undo() -> None:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate

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
    try:
        from .lmtp import MaildirHandler, MaildirServer
    except ImportError as exc:  # pragma: no cover - only without the server extra
        _say(f"maildrop {args.command}: {exc}")
        return EX_UNAVAILABLE
    undo = _setup_logging()
    try:
        return await _serve(args, stop, ready, MaildirHandler, MaildirServer, listeners)
    finally:
        undo()


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
        return_path=not args.no_return_path,
        delivered_to=not args.no_delivered_to,
        single_copy=not args.separate_copies,
        crlf_to_lf=not args.keep_crlf,
        recipient_delimiter=args.recipient_delimiter or None,
    )
    # A little above max_size, so the handler answers 552 5.3.4 for a message slightly
    # too large; far beyond it aiosmtpd stops buffering (552 without an enhanced code).
    limit = args.max_size + args.max_size // 16 + 4096
    server = server_class(
        handler, lmtp=args.command == "lmtp", hostname=args.hostname, data_size_limit=limit
    )
    try:
        if listeners is not None:
            addresses = [a for lsn in listeners for a in await server.listen_socket(lsn.sock)]
        else:
            addresses = [a for spec in args.listen for a in await server.listen(spec)]
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
