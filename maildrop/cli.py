"""The ``maildrop`` command: deliver from stdin, serve LMTP/SMTP, sweep stale tmp files.

Exit statuses follow sysexits.h through :func:`maildrop.outcome`, the same mapping the
servers use: 0 delivered, 75 temporary failure (disk full, I/O error), 77 permission
problem, 65 message too large, 67 no such maildir or folder, 64 bad usage. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from typing import IO, NoReturn

from . import Maildir, MaildirNotFoundError, __version__, outcome
from ._errors import EX_USAGE
from ._maildir import TMP_MAX_AGE

__all__ = ["main", "parse_duration", "parse_size"]


_SIZE = re.compile(r"(\d+)\s*([kmgt]?)i?b?", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_MULTIPLES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad command-line usage: reported on one line, exit status 64."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def parse_size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``512K``, ``10M``, ``1G`` (binary multiples)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use bytes, or a number with K, M or G (e.g. 10M)"
        )
    return int(m[1]) * _MULTIPLES[m[2].lower()]


def parse_duration(text: str) -> float:
    """Parse a duration: ``36h``, ``90m``, ``2d``, ``1w``; a bare number is seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 36h)"
        )
    return float(m[1]) * _UNITS[m[2].lower()]


def _build_parser() -> _Parser:
    from ._cli_serve import add_server_commands

    parser = _Parser(
        prog="maildrop",
        description="Deliver mail into Maildir mailboxes durably: from stdin (an MDA for "
        "Postfix, fetchmail, procmail), as an LMTP or SMTP server, and sweep stale tmp/ files.",
        epilog="Exit status (sysexits.h): 0 delivered, 75 temporary failure (retry later), "
        "77 permission problem, 65 message too large, 67 no such maildir or folder, 64 usage.",
    )
    parser.add_argument("--version", action="version", version=f"maildrop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "deliver",
        help="deliver one message from stdin into a maildir",
        description="Read one message from stdin and deliver it into MAILDIR (created if "
        "missing). Prints the delivered file's path once it is durable. A leading mbox "
        "'From ' line (as Postfix's mailbox_command sends) is dropped.",
        epilog="Example: maildrop deliver --folder Lists.python ~/Maildir < message.eml",
    )
    d.add_argument("maildir", metavar="MAILDIR", help="the maildir (e.g. ~/Maildir)")
    d.add_argument(
        "--folder",
        metavar="NAME",
        help="deliver into this existing Maildir++ folder (e.g. Lists.python) instead of INBOX",
    )
    d.add_argument(
        "--create-folder", action="store_true", help="create the --folder if it is missing"
    )
    d.add_argument(
        "--max-size",
        metavar="BYTES",
        type=parse_size,
        help="refuse larger messages with exit status 65 (accepts K, M, G suffixes)",
    )
    d.add_argument(
        "--crlf-to-lf", action="store_true", help="store CRLF line endings as LF (maildir style)"
    )
    d.add_argument(
        "--return-path", metavar="ADDRESS", help="prepend 'Return-Path: <ADDRESS>' ('' for <>)"
    )
    d.add_argument("--delivered-to", metavar="ADDRESS", help="prepend 'Delivered-To: ADDRESS'")
    d.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (fast, NOT durable: tests only)"
    )

    add_server_commands(sub)

    c = sub.add_parser(
        "clean-tmp",
        help="remove stale files from a maildir's tmp/ directories",
        description="Remove files older than --older-than (by access, change and "
        "modification time) from MAILDIR/tmp/ and from the tmp/ of each of its Maildir++ "
        "folders: leftovers of crashed deliveries. Prints each removed path.",
        epilog="Example: maildrop clean-tmp --older-than 36h ~/Maildir",
    )
    c.add_argument("maildir", metavar="MAILDIR", help="the maildir")
    c.add_argument(
        "--older-than",
        metavar="DURATION",
        type=parse_duration,
        default=float(TMP_MAX_AGE),
        help="age of files to remove: 36h (the default, as the maildir spec says), 90m, 2d",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``maildrop`` command with *argv* (default ``sys.argv[1:]``); return its status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _say(str(exc))
        return EX_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    prog = f"maildrop {args.command}" if args.command else "maildrop"
    try:
        if args.command == "deliver":
            return asyncio.run(_deliver(_deliver_target(args), args))
        if args.command in ("lmtp", "smtp"):
            from ._cli_serve import run_server

            return run_server(args)
        if args.command == "clean-tmp":
            return asyncio.run(_clean_tmp(_tmp_dirs(args.maildir), args.older_than))
        parser.print_usage(sys.stderr)
        _say("maildrop: a COMMAND is needed (see 'maildrop --help')")
        return EX_USAGE
    except UsageError as exc:
        _say(f"{prog}: {exc}")
        return EX_USAGE
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as exc:
        out = outcome(exc)
        kind = "temporary failure" if out.temporary else "permanent failure"
        _say(f"{prog}: {_one_line(exc)} ({out.text}; {kind}, exit status {out.exit_code})")
        return out.exit_code


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# -- deliver --------------------------------------------------------------------------------


class _Prefixed:
    """A binary file that first returns *prefix*: a peeked line put back on a pipe."""

    def __init__(self, prefix: bytes, f: IO[bytes]) -> None:
        self._prefix = prefix
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return self._f.read(n)


def _is_from_line(line: bytes) -> bool:
    return line.startswith(b"From ") and line.endswith(b"\n")


def message_source(f: IO[bytes]) -> IO[bytes] | _Prefixed:
    """Return *f* positioned after a leading mbox ``From `` line, if there is one."""
    seekable = False
    try:
        seekable = f.seekable()
        start = f.tell() if seekable else 0
    except OSError:
        seekable = False
    line = f.readline(4096)
    if _is_from_line(line):
        return f
    if seekable:
        f.seek(start)
        return f
    return _Prefixed(line, f)


def _stdin() -> IO[bytes]:
    return sys.stdin.buffer


def _deliver_target(args: argparse.Namespace) -> Maildir:
    path = os.path.realpath(os.path.expanduser(args.maildir))
    md = Maildir(path, fsync=not args.no_fsync, max_size=args.max_size)
    if args.folder is not None:
        md = md.folder(args.folder)
        if not args.create_folder and not os.path.isdir(md.path):
            raise MaildirNotFoundError(
                f"no folder {args.folder!r} in {path} (create it first, or pass --create-folder)"
            )
    return md


async def _deliver(md: Maildir, args: argparse.Namespace) -> int:
    delivery = await md.deliver(
        message_source(_stdin()),
        return_path=args.return_path,
        delivered_to=args.delivered_to,
        crlf_to_lf=args.crlf_to_lf,
    )
    print(delivery.path, flush=True)
    return 0


# -- clean-tmp ------------------------------------------------------------------------------


def _tmp_dirs(maildir: str) -> list[str]:
    """Return *maildir* and each of its Maildir++ folders that has a ``tmp/``."""
    path = os.path.realpath(os.path.expanduser(maildir))
    if not os.path.isdir(os.path.join(path, "tmp")):
        raise MaildirNotFoundError(f"no maildir at {path} (it has no tmp/ directory)")
    return [path] + [
        os.path.join(path, entry)
        for entry in sorted(os.listdir(path))
        if entry.startswith(".") and entry not in (".", "..")
        and os.path.isdir(os.path.join(path, entry, "tmp"))
    ]  # fmt: skip


async def _clean_tmp(dirs: list[str], older_than: float) -> int:
    total = 0
    for d in dirs:
        for name in await Maildir(d, create=False).clean_tmp(older_than):
            print(f"removed {os.path.join(d, 'tmp', name)}")
            total += 1
    print(f"removed {total} stale file{'' if total == 1 else 's'} from {dirs[0]}", flush=True)
    return 0
