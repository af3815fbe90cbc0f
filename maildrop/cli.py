"""The ``maildrop`` command: deliver from stdin, serve LMTP/SMTP, sweep stale tmp files.

Exit statuses follow sysexits.h through :func:`maildrop.outcome`, the mapping the servers use
(the table is in ``_errors`` and README); errors are one line on stderr, never a traceback.

An MTA starts ``maildrop deliver`` once per message, so this module imports almost nothing:
plain ``deliver`` options are read by :func:`_quick_deliver_args` from the same option table
argparse is built from, and argparse (with the server modules) is only imported for
``--help``, a usage error, abbreviations and the other commands.
"""

from __future__ import annotations

import os
import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from argparse import Namespace as _Args
    from collections.abc import Callable, Sequence
    from typing import NoReturn

    from ._quota import Quota
    from ._sys import Syscalls
else:
    # Parsed options as attributes, like argparse's Namespace (which the other commands get).
    from types import SimpleNamespace as _Args

__all__ = ["describe", "inbox_folder", "main", "parse_duration", "parse_quota", "parse_size"]

EX_USAGE = 64
EX_NOINPUT = 66

# Patterns, compiled (and cached by re) on first use: most runs parse no size at all.
_SIZE = r"(\d+)\s*([kmgt]?)i?b?"
_DURATION = r"(\d+(?:\.\d+)?)\s*([smhdw]?)"
_MULTIPLES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad command-line usage: reported on one line, exit status 64."""


class NoInputError(Exception):
    """There is no standard input to read the message from: exit status 66."""


def _bad_value(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def _number_and_unit(text: str, pattern: str, what: str, hint: str) -> tuple[str, str]:
    """Split *text* by *pattern* into its number and its (lower-case) unit."""
    m = re.fullmatch(pattern, text.strip(), re.IGNORECASE)
    if m is None:
        raise _bad_value(f"invalid {what} {text!r}: {hint}")
    return m[1], m[2].lower()


def parse_size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``512K``, ``10M``, ``1G`` (binary multiples)."""
    hint = "use bytes, or a number with K, M or G (e.g. 10M)"
    number, unit = _number_and_unit(text, _SIZE, "size", hint)
    return int(number) * _MULTIPLES[unit]


def parse_duration(text: str) -> float:
    """Parse a duration: ``36h``, ``90m``, ``2d``, ``1w``; a bare number is seconds."""
    hint = "use a number with s, m, h, d or w (e.g. 36h)"
    number, unit = _number_and_unit(text, _DURATION, "duration", hint)
    return float(number) * _UNITS[unit]


def parse_quota(text: str) -> tuple[int | None, int | None]:
    """Parse ``SIZE[,COUNT]`` (``100M``, ``100M,5000``, ``0,5000``); 0 means no limit."""
    size, _, count = text.partition(",")
    limit_bytes = parse_size(size) if size.strip() else 0
    if count.strip() and not count.strip().isdigit():
        raise _bad_value(f"invalid quota {text!r}: COUNT must be a number of messages")
    limit_messages = int(count) if count.strip() else 0
    if not (limit_bytes or limit_messages):
        raise _bad_value(f"invalid quota {text!r}: give a size, a count or both (e.g. 1G,10000)")
    return limit_bytes or None, limit_messages or None


# -- the deliver options: one table for argparse and for the quick reader ---------------------

# (flag, metavar or None for a switch, converter, help)
_DELIVER_OPTIONS: tuple[tuple[str, str | None, Callable[[str], object] | None, str], ...] = (
    ("--folder", "NAME", None, "deliver into this existing Maildir++ folder (e.g. "
     "Lists.python); INBOX (any case) is the maildir itself and INBOX.Lists.python is "
     "Lists.python, as IMAP servers and Sieve name them"),
    ("--create-folder", None, None, "create the --folder if it is missing"),
    ("--max-size", "BYTES", parse_size,
     "refuse larger messages with exit status 65 (accepts K, M, G suffixes)"),
    ("--quota", "SIZE[,COUNT]", parse_quota, "enforce this Maildir++ quota (e.g. 1G,10000) "
     "and record it in maildirsize; by default the limits an existing maildirsize declares "
     "are enforced and updated"),
    ("--no-quota", None, None, "neither enforce nor update maildirsize"),
    ("--quota-permanent", None, None, "over quota, exit 73 (the MTA bounces) instead of 75 "
     "(the MTA retries)"),
    ("--crlf-to-lf", None, None, "store CRLF line endings as LF (maildir style)"),
    ("--return-path", "ADDRESS", None, "prepend 'Return-Path: <ADDRESS>' ('' for <>)"),
    ("--delivered-to", "ADDRESS", None, "prepend 'Delivered-To: ADDRESS'"),
    ("--no-fsync", None, None, "skip fsync (fast, NOT durable: tests only)"),
)  # fmt: skip
_DELIVER_BY_FLAG = {opt[0]: opt for opt in _DELIVER_OPTIONS}


def _quick_deliver_args(argv: Sequence[str]) -> _Args | None:
    """Read plain ``deliver`` options without argparse; None means "ask argparse".

    Only exact option names in ``--opt VALUE`` or ``--opt=VALUE`` form are taken; anything
    else (``--help``, an abbreviation, a bad value, a missing or extra MAILDIR) goes to
    argparse, which gives the help or the usage error.
    """
    values: dict[str, object] = {opt[0][2:].replace("-", "_"): None for opt in _DELIVER_OPTIONS}
    for flag, metavar, _, _ in _DELIVER_OPTIONS:
        if metavar is None:
            values[flag[2:].replace("-", "_")] = False
    positional: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if arg == "--":
            positional.extend(args)
            break
        flag, eq, value = arg.partition("=")
        opt = _DELIVER_BY_FLAG.get(flag)
        if opt is None:
            return None
        _, metavar, convert, _ = opt
        if metavar is None:
            if eq:
                return None
            values[flag[2:].replace("-", "_")] = True
            continue
        if not eq:
            following = next(args, None)
            if following is None or following.startswith("-"):
                return None
            value = following
        try:
            values[flag[2:].replace("-", "_")] = value if convert is None else convert(value)
        except Exception:
            return None
    if len(positional) != 1:
        return None
    return _Args(command="deliver", maildir=positional[0], **values)


def _build_parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__
    from ._cli_serve import add_server_commands
    from ._sweep import TMP_MAX_AGE

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    parser = Parser(
        prog="maildrop",
        description="Deliver mail into Maildir mailboxes durably: from stdin (an MDA for "
        "Postfix, fetchmail, procmail), as an LMTP or SMTP server, and sweep stale tmp/ files.",
        epilog="Exit status (sysexits.h): 0 delivered; 75 temporary failure, the MTA retries "
        "(disk full, I/O error, permission problem, over quota, interrupted); 65 message too "
        "large or empty; 67 no such maildir or folder; 73 the maildir is a file or a symlink, "
        "or over a --quota-permanent quota; 66 no standard input; 64 usage.",
    )
    parser.add_argument("--version", action="version", version=f"maildrop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "deliver",
        help="deliver one message from stdin into a maildir",
        description="Read one message from stdin and deliver it into MAILDIR (created if "
        "missing). Prints the delivered file's path once it is durable. A leading mbox "
        "'From ' line (as Postfix's mailbox_command sends) is dropped. An existing "
        "maildirsize (Maildir++ quota) is enforced and updated. SIGINT or SIGTERM while the "
        "message is read stops the delivery (exit 75, nothing left behind).",
        epilog="Example: maildrop deliver --folder Lists.python ~/Maildir < message.eml",
    )
    d.add_argument("maildir", metavar="MAILDIR", help="the maildir (e.g. ~/Maildir)")
    for flag, metavar, convert, text in _DELIVER_OPTIONS:
        if metavar is None:
            d.add_argument(flag, action="store_true", help=text)
        elif convert is None:
            d.add_argument(flag, metavar=metavar, help=text)
        else:
            d.add_argument(flag, metavar=metavar, type=convert, help=text)
    add_server_commands(sub)
    c = sub.add_parser(
        "clean-tmp",
        help="remove stale files from a maildir's tmp/ directories",
        description="Remove files older than --older-than (by access, change and "
        "modification time) from MAILDIR/tmp/ and from the tmp/ of each of its Maildir++ "
        "folders: leftovers of crashed deliveries. Prints each removed path. A folder that "
        "cannot be cleaned is reported and skipped (exit 75 at the end).",
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
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["deliver"]:
        quick = _quick_deliver_args(args[1:])
        if quick is not None:
            return _run("maildrop deliver", _deliver, quick)
    parser = _build_parser()
    try:
        parsed = parser.parse_args(args)
    except UsageError as exc:
        _say(str(exc))
        return EX_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if parsed.command == "deliver":
        return _run("maildrop deliver", _deliver, parsed)
    if parsed.command in ("lmtp", "smtp"):
        from ._cli_serve import run_server

        return _run(f"maildrop {parsed.command}", run_server, parsed)
    if parsed.command == "clean-tmp":
        from ._cli_clean import clean_tmp

        return _run("maildrop clean-tmp", clean_tmp, parsed)
    parser.print_usage(sys.stderr)
    _say("maildrop: a COMMAND is needed (see 'maildrop --help')")
    return EX_USAGE


def _run(prog: str, command: Callable[[_Args], int], args: _Args) -> int:
    """Run *command*; turn any failure into one line on stderr and its exit status."""
    try:
        return command(args)
    except UsageError as exc:
        _say(f"{prog}: {exc}")
        return EX_USAGE
    except NoInputError as exc:
        _say(f"{prog}: {exc} (exit status {EX_NOINPUT})")
        return EX_NOINPUT
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as exc:
        from ._errors import outcome

        out = outcome(exc)
        kind = "temporary failure" if out.temporary else "permanent failure"
        _say(f"{prog}: {describe(exc)} ({out.text}; {kind}, exit status {out.exit_code})")
        return out.exit_code


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    """Return *exc* as one line; a disk error says what failed and on which path."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror  # without the "[Errno N]" prefix
        if exc.filename is not None:
            text = f"{text}: {os.fsdecode(exc.filename)!r}"
    return " ".join(text.split())


# -- deliver --------------------------------------------------------------------------------


def _stdin_fd() -> int:
    return 0


def _syscalls() -> Syscalls:
    from ._sys import DEFAULT_SYSCALLS

    return DEFAULT_SYSCALLS


def _is_dir(path: str) -> bool:
    from ._sys import stat_or_none

    st = stat_or_none(_syscalls(), path)
    return st is not None and (st.st_mode & 0o170000) == 0o040000  # S_ISDIR, no stat module


def inbox_folder(name: str | None) -> str | None:
    """Return the Maildir++ folder that *name* means; None for the maildir itself.

    ``INBOX`` (any case) is the top maildir, as IMAP servers, Sieve and mail clients call
    it, and ``INBOX.Lists.python`` is ``Lists.python``.
    """
    if name is None or name.upper() == "INBOX":
        return None
    if name[:6].upper() == "INBOX.":
        return name[6:]
    return name


def _quota(args: _Args, root: str) -> Quota | None:
    """Return the quota to enforce: --quota's, else maildirsize's if there is one, or None."""
    if args.quota is not None and args.no_quota:
        raise UsageError("--quota and --no-quota contradict each other; pass one")
    if args.no_quota:
        return None
    if args.quota is None:
        # Without a maildirsize there is nothing to enforce: skip loading the quota code
        # (start-up time). One created meanwhile counts from the next delivery on, which
        # is as exact as Maildir++ is between processes anyway.
        try:
            _syscalls().stat(os.path.join(root, "maildirsize"), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError:
            pass  # not a directory, not searchable...: the delivery reports it properly
    from ._quota import Quota

    limit_bytes, limit_messages = args.quota or (None, None)
    return Quota(limit_bytes, limit_messages, permanent=bool(args.quota_permanent))


def _deliver(args: _Args) -> int:
    from ._errors import MaildirNotFoundError
    from ._mda import deliver_fd
    from ._steps import Steps
    from ._writer import Settings

    fd = _stdin_fd()
    try:
        os.fstat(fd)
    except OSError:
        raise NoInputError(
            "standard input is closed: there is no message to deliver (pipe one in)"
        ) from None
    root = os.path.realpath(os.path.expanduser(str(args.maildir)))
    folder = inbox_folder(args.folder)
    dirname = None
    if folder is not None:
        from ._folders import folder_dirname

        dirname = folder_dirname(folder)
        if not args.create_folder and not _is_dir(os.path.join(root, dirname)):
            raise MaildirNotFoundError(
                f"no folder {folder!r} in {root} (create it first, or pass --create-folder)"
            )
    settings = Settings(root, dirname, True, not args.no_fsync, _syscalls(), args.max_size)
    quota = _quota(args, root)
    transform = None
    if args.return_path is not None or args.delivered_to is not None or args.crlf_to_lf:
        from ._transform import make_transform

        transform = make_transform(
            return_path=args.return_path,
            delivered_to=args.delivered_to,
            crlf_to_lf=bool(args.crlf_to_lf),
        )
    guard = None
    if quota is not None:
        from ._quota_io import QuotaGuard

        guard = QuotaGuard(quota, settings)
    path = deliver_fd(Steps(settings, transform=transform, quota=guard), fd)
    # contextlib.suppress would load contextlib on the MDA's start-up path.
    try:  # noqa: SIM105
        print(path, flush=True)
    except OSError:  # stdout gone (a closed pipe): the message is delivered all the same
        pass
    return 0
