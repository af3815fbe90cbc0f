"""The process side of ``maildrop lmtp``/``smtp``: bind before any event loop exists, then
serve in this process or in supervised worker processes, and bound the exit after a second
signal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from . import _accept, _pool
from ._cli_serve import _announce, _quota, _serve_until_signal, _setup_logging
from ._errors import outcome
from ._listen import Listener, bind
from ._log import flush_all
from ._supervisor import WorkerSide, default_workers, supervise
from .cli import UsageError

__all__ = ["HARD_STOP_SECONDS", "run_server"]

#: After a second signal, how long deliveries get to be cancelled cleanly before the process
#: exits anyway (a worker thread blocked in a syscall must not hold the exit up).
HARD_STOP_SECONDS = 0.5

log = logging.getLogger("maildrop")


def run_server(args: argparse.Namespace) -> int:
    """Run the parsed ``lmtp``/``smtp`` command until a signal stops it; return its status.

    The listening sockets are bound here, before any event loop or worker exists; this
    process owns them (and removes its Unix socket files on exit).
    """
    args.root = os.path.realpath(os.path.expanduser(args.root))
    if not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root!r} is not a directory")
    _quota(args)  # a contradiction among the quota flags is a usage error before any fork
    workers = args.workers or default_workers()
    if args.hostname is None:
        args.hostname = socket.getfqdn()  # once, not once per worker
    undo = _setup_logging()
    core, _pool.CORE_THREADS = _pool.CORE_THREADS, _pool.SERVER_CORE_THREADS  # see there
    try:
        listeners = _bind_all(args.listen)
        try:
            if workers == 1:
                stopper = _HardStop(listeners)
                return asyncio.run(
                    _serve_until_signal(
                        args,
                        lambda addresses: _announce(args, addresses),
                        listeners=listeners,
                        hard_stop=stopper.arm,
                    )
                )
            return _supervised(args, listeners, workers)
        finally:
            for listener in listeners:
                listener.close()
    finally:
        _pool.CORE_THREADS = core
        undo()


def _bind_all(specs: Sequence[str]) -> list[Listener]:
    out: list[Listener] = []
    try:
        for spec in specs:
            out.extend(bind(spec))
    except BaseException as exc:
        for listener in out:
            listener.close()
        if isinstance(exc, ValueError):
            raise UsageError(str(exc)) from None
        raise
    return out


def _supervised(args: argparse.Namespace, listeners: list[Listener], workers: int) -> int:
    """Serve with *workers* forked processes; this one only supervises them."""
    # Import before forking, so a missing server extra fails once and workers share the code.
    from . import lmtp  # noqa: F401

    share = _accept.Share(workers)  # made before forking: every worker maps the same counts

    def run_worker(side: WorkerSide) -> int:
        share.join(side.slot)  # counted from its first listen: siblings wait for no one
        _accept.SHARE = share
        try:
            return asyncio.run(
                _serve_until_signal(
                    args, lambda _: side.ready(), listeners=listeners, lifeline=side.lifeline
                )
            )
        except Exception as exc:
            log.error("worker (pid %d) cannot serve: %s", os.getpid(), exc)
            return outcome(exc).exit_code

    addresses = [listener.address for listener in listeners]
    return supervise(
        workers, run_worker, lambda: _announce(args, addresses, workers), share.vacate
    )


class _HardStop:
    """After a second signal, exit 130 within HARD_STOP_SECONDS whatever is still running."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.listeners = listeners

    def arm(self) -> None:
        threading.Thread(target=self._run, name="maildrop hard stop", daemon=True).start()

    def _run(self) -> None:
        time.sleep(HARD_STOP_SECONDS)
        log.warning(
            "deliveries still running %ss after the second signal: exiting", HARD_STOP_SECONDS
        )
        for listener in self.listeners:
            listener.close()
        flush_all()
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)
