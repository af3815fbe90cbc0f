"""Child process for the crash tests: deliver through the public API, ack, maybe die.

``python child.py run CONFIG_JSON`` runs one job. ``python child.py serve PARALLEL`` reads one
job per stdin line (``{"id": ..., ...config}``), forks a child per job (at most PARALLEL at a
time, so the interpreter and maildrop are imported once) and prints one JSON result line per
job: its id, pid, exit status or killing signal, and everything it acked.

``python child.py fill CONFIG_JSON`` fills a tiny tmpfs (inside ``unshare -m``).

A job acks each delivery with ONE ``os.write(ackfd, b"<marker> <id> <name>\\n")`` only after
``deliver()`` returned, so a reader never sees half an ack. Config keys (all optional but
``md``): ``folder``, ``fsync``, ``plan`` (``[[kind, size], ...]``, kind ``bytes``, ``chunks``
or ``file``), ``repeat``, ``tag``, ``concurrency``, ``kill`` (``{"step", "k", "when":
"before"|"after"}``: SIGKILL around the k-th call of a syscall-table step), ``kill_after``
(seconds), ``count`` (print per-step call counts), ``shutdown_after`` + ``mount``
(EXT4_IOC_SHUTDOWN after the k-th ack), ``after_shutdown`` (deliveries to try after it),
``cut`` (``{"step", "k"}``: shut the filesystem down right before that call and go on),
``remount`` (served jobs: the server remounts the filesystem after the job),
``hostname`` (only inside a private UTS namespace), ``uid``, ``hostile``, ``api``
(``"asyncio"``; ``"compat"``: ``compat.MaildirMailbox.appendMessage``, bytes only;
``"many"``: ``deliver_many`` into ``md`` and ``md + "-b"``, acked as ACK and ACKB),
``skip_fstat`` (negative control: drop the engine's fstat after ``fsync(new/)``),
``backend`` (``"uring"``: the io_uring backend, with ``uring`` hooks: see _uring_child.py;
``"auto"``: the default backend choice with the default table, no hooks, and a ``RING <n>``
line with the ring's completions before the power cut's ``DONE``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _device import wait_released
from _msg import make

from maildrop import DEFAULT_SYSCALLS, Delivery, Maildir, Syscalls, deliver_many

EXT4_IOC_SHUTDOWN = 0x8004587D
NOLOGFLUSH = 2
STEPS = [f.name for f in dataclasses.fields(Syscalls)]


def shutdown(mount: str) -> None:
    """Cut power to the filesystem at *mount*: everything not yet synced is dropped."""
    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", NOLOGFLUSH))
    finally:
        os.close(fd)


def _is_tmp_create(args: tuple[Any, ...]) -> bool:
    return len(args) >= 2 and isinstance(args[1], int) and bool(args[1] & os.O_CREAT)


def build_table(cfg: dict[str, Any], counts: dict[str, int]) -> Syscalls:
    """Wrap every step: count its calls, SIGKILL around one of them, play the attacker."""
    kill = cfg.get("kill")
    cut = cfg.get("cut")
    hostile = cfg.get("hostile")
    lock = threading.Lock()
    state: dict[str, Any] = {"tmp": None, "creates": 0, "links": 0}

    def wrap(step: str) -> Callable[..., Any]:
        real = getattr(DEFAULT_SYSCALLS, step)

        def call(*args: Any, **kwargs: Any) -> Any:
            with lock:
                n = counts[step] = counts.get(step, 0) + 1
            hit = kill is not None and kill["step"] == step and kill["k"] == n
            if hit and kill["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            if cut is not None and cut["step"] == step and cut["k"] == n:
                shutdown(cfg["mount"])  # the power fails; this process keeps running
            if hostile is not None:
                _attack(hostile, step, args, kwargs, state)
            try:
                result = real(*args, **kwargs)
            finally:
                if hit:  # right after the call, whether it succeeded or failed
                    os.kill(os.getpid(), signal.SIGKILL)
            if step == "open" and _is_tmp_create(args) and args[0] != "maildirfolder":
                state["tmp"] = (args[0], kwargs.get("dir_fd"))
            return result

        return call

    table = DEFAULT_SYSCALLS.replace(**{s: wrap(s) for s in STEPS})
    if cfg.get("skip_fstat"):
        # Negative control: the engine without its post-fsync liveness check.
        table = table.replace(fstat=lambda fd: None)
    return table


def _attack(
    hostile: dict[str, Any], step: str, args: tuple[Any, ...], kw: dict[str, Any], st: Any
) -> None:
    """What a local attacker with write access to the maildir does at this moment."""
    canary = hostile["canary_file"]
    if step == "open" and _is_tmp_create(args) and args[0] != "maildirfolder":
        # Win the race for the tmp name: plant a symlink, then a hard link, at the name the
        # engine is about to create. O_EXCL must refuse both; the engine picks a new name.
        st["creates"] += 1
        if hostile.get("plant_tmp") and st["creates"] <= 2:
            if st["creates"] == 1:
                os.symlink(canary, args[0], dir_fd=kw["dir_fd"])
            else:
                os.link(canary, args[0], dst_dir_fd=kw["dir_fd"])
    if step == "link":
        st["links"] += 1
        name, dst_fd = args[1], kw["dst_dir_fd"]
        if hostile.get("plant_new") and st["links"] == 1:
            os.symlink(canary, name, dir_fd=dst_fd)
        if hostile.get("swap") and st["links"] == 1 and st["tmp"] is not None:
            # Swap the tmp file for a link to the canary between write and publish.
            tmp_name, tmp_fd = st["tmp"]
            os.rename(tmp_name, tmp_name + ".moved", src_dir_fd=tmp_fd, dst_dir_fd=tmp_fd)
            if hostile["swap"] == "symlink":
                os.symlink(canary, tmp_name, dir_fd=tmp_fd)
            else:
                os.link(canary, tmp_name, dst_dir_fd=tmp_fd)


def open_maildir(cfg: dict[str, Any], path: str, table: Syscalls) -> Maildir:
    """The job's maildir: on the io_uring backend (no table: the ring's hooks stand in), or
    on the thread backend with the job's syscall table."""
    if cfg.get("backend") in ("uring", "auto"):  # "auto": the default table, no hooks
        return Maildir(path, fsync=cfg.get("fsync", True), backend=cfg["backend"])
    return Maildir(path, fsync=cfg.get("fsync", True), syscalls=table)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def deliver_all(cfg: dict[str, Any], table: Syscalls) -> None:
    """Deliver the job's plan, acking each delivery once deliver() returned."""
    md = open_maildir(cfg, cfg["md"], table)
    if cfg.get("folder") is not None:
        md = md.folder(cfg["folder"])
    plan = [tuple(p) for p in cfg.get("plan", [["bytes", 100]])] * cfg.get("repeat", 1)
    ackfd = cfg.get("ackfd", 1)
    marker = cfg.get("marker", "ACK")
    tag = cfg.get("tag", f"p{os.getpid()}")
    shutdown_after = cfg.get("shutdown_after")
    jobs = iter(enumerate(plan))
    acked = 0
    api = cfg.get("api", "asyncio")

    async def compat_deliver(data: bytes) -> str:
        # The Twisted-compatible face: MaildirMailbox.appendMessage() -> Deferred.
        import compat

        mbox = compat.MaildirMailbox(cfg["md"])
        # The task's steps go through its `syscalls` table: give it the faulty one.
        mbox.AppendFactory = type(
            "Task", (compat.MaildirMailboxAppendMessageTask,), {"syscalls": table}
        )
        d = mbox.appendMessage(data)
        if hasattr(d, "asFuture"):  # a real Twisted Deferred
            await d.asFuture(asyncio.get_running_loop())
        else:
            await d
        return os.path.basename(os.fsdecode(mbox.list[-1]))

    async def many_deliver(ident: str, source: Any) -> str:
        # deliver_many(): written once, linked into md and into its sibling md + "-b". The
        # sibling's ack is written here; md's by the caller (or its error raised).
        other = open_maildir(cfg, cfg["md"] + "-b", table)
        first, second = await deliver_many(source, [md, other])
        if isinstance(second, Delivery):
            os.write(ackfd, f"{marker}B {ident} {second.name}\n".encode())
        if isinstance(first, Exception):
            raise first
        return first.name

    async def one(i: int, kind: str, size: int) -> None:
        nonlocal acked
        ident = f"{tag}-{i}"
        data = make(ident, size)
        source: Any = data
        if kind == "chunks":
            source = _chunks(data, 64 * 1024)
        elif kind == "file":
            path = os.path.join(cfg["scratch"], f"src-{os.getpid()}-{i}")
            with open(path, "wb") as f:
                f.write(data)
            source = open(path, "rb")  # noqa: SIM115 - closed below
        try:
            if api == "compat":
                name = await compat_deliver(data)
            elif api == "many":
                name = await many_deliver(ident, source)
            else:
                name = (await md.deliver(source)).name
        except OSError as exc:
            if not power_cut:
                raise
            # In flight when the power was cut: it must fail (or be durable and ack).
            os.write(ackfd, f"INFLIGHT {exc.errno}\n".encode())
            return
        finally:
            if kind == "file":
                source.close()
                if not power_cut:
                    os.unlink(path)
        if power_cut:
            os.write(ackfd, f"POSTCUT {ident}\n".encode())
        os.write(ackfd, f"{marker} {ident} {name}\n".encode("utf-8", "surrogateescape"))
        acked += 1
        if shutdown_after is not None and acked == shutdown_after:
            shutdown(cfg["mount"])
            power_cut.append(True)

    async def after_shutdown() -> None:
        # After the shutdown every syscall on that filesystem fails with EIO: each delivery
        # must raise, never report success.
        for i in range(cfg.get("after_shutdown", 0)):
            try:
                d = await md.deliver(make(f"{tag}-dead-{i}", 100))
            except OSError as exc:
                os.write(ackfd, f"FAILED {exc.errno}\n".encode())
            else:
                os.write(ackfd, f"SUCCEEDED {d.name}\n".encode())
        os.write(ackfd, b"DONE\n")

    async def worker() -> None:
        for i, (kind, size) in jobs:
            if power_cut:
                return
            await one(i, str(kind), int(size))

    power_cut: list[bool] = []
    await asyncio.gather(*(worker() for _ in range(cfg.get("concurrency", 1))))
    if cfg.get("backend") == "auto":  # which backends "auto" took (each kind's commits)
        from maildrop import _uring_backend

        made = _uring_backend._backends.made(asyncio.get_running_loop())
        ring = made.ring.completions if isinstance(made, _uring_backend.UringBackend) else 0
        os.write(ackfd, f"RING {ring}\n".encode())
    if power_cut:
        await after_shutdown()


def run(cfg: dict[str, Any]) -> None:
    """Run one job in this process."""
    if cfg.get("hostname") is not None:
        # Only ever in a private UTS namespace: setting the host's own name breaks others.
        if os.readlink("/proc/self/ns/uts") == cfg["host_uts_ns"]:
            raise SystemExit("refusing to set the hostname outside a private UTS namespace")
        socket.sethostname(cfg["hostname"].encode("latin-1"))
    if cfg.get("uid") is not None:
        # The interpreter's files may be unreadable to that uid: import what runs later now.
        # Two throwaway concurrent deliveries (the second one waits for a shared directory
        # fsync) run every lazy import before the switch, so the trace of what the uid
        # opens shows the engine's opens only.
        warm = os.path.join(cfg["warm"], f"warm-{os.getpid()}")

        async def warm_up() -> None:
            md = open_maildir(cfg, warm, DEFAULT_SYSCALLS)
            await asyncio.gather(*(md.deliver(b"warm-up") for _ in range(8)))
            # Whether a shared fsync ran above depends on timing ("auto" may have put some
            # of them on the ring): the thread path's group commit waits on an anyio.Event,
            # whose first use imports anyio's asyncio backend.
            anyio.Event()
            # And "auto" loads the ring's modules in a thread once deliveries overlap.
            import maildrop._uring_backend  # noqa: F401

        asyncio.run(warm_up())
        shutil.rmtree(warm)
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    if cfg.get("threads") is not None:
        # strace counts `when=k` per thread: with one worker every call of the delivery
        # happens in the same thread, so the k-th call is the same in every run.
        import maildrop._pool

        maildrop._pool.THREADS = cfg["threads"]
    if cfg.get("kill_after") is not None:
        t = threading.Timer(cfg["kill_after"], os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()
    counts: dict[str, int] = {}
    if cfg.get("backend") == "auto":
        os.environ.pop("MAILDROP_BACKEND", None)  # "auto" as shipped, whatever the test set
    if cfg.get("backend") == "uring":
        from _uring_child import setup

        rec = setup(cfg, shutdown)
        table = DEFAULT_SYSCALLS
    else:
        table = build_table(cfg, counts)
    ackfd = cfg.get("ackfd", 1)
    try:
        asyncio.run(deliver_all(cfg, table))
    except OSError as exc:
        os.write(ackfd, f"ERROR {exc.errno} {type(exc).__name__}\n".encode())
        failed = True
    else:
        failed = False
    if cfg.get("count") and cfg.get("backend") == "uring":
        counts = {"ops": rec.ops}
    if cfg.get("count"):
        os.write(ackfd, f"COUNTS {json.dumps(counts)}\n".encode())
    if failed:
        os._exit(3)


def fill(cfg: dict[str, Any]) -> None:
    """Deliver into a tiny tmpfs until it is full; print what happened as JSON.

    Runs as root inside ``unshare -m --propagation private``: the tmpfs exists only in this
    process's mount namespace. The mount is asserted (a silently failed mount once filled a
    host disk) and the bytes written are capped.
    """
    from _msg import scan

    from maildrop import outcome

    if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
        raise SystemExit("refusing to mount outside a private mount namespace")
    mnt = cfg["dir"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", cfg["opts"], "tmpfs", mnt], check=True)
    if not os.path.ismount(mnt):
        raise SystemExit(f"{mnt} is not a mount point: refusing to fill it")
    md_path = os.path.join(mnt, "Maildir")
    md = open_maildir(cfg, md_path, DEFAULT_SYSCALLS)
    out: dict[str, Any] = {"delivered": 0}

    async def main() -> None:
        written = 0
        while True:
            ident = f"fill-{out['delivered']}"
            data = make(ident, cfg["size"])
            written += len(data)
            if written > cfg["cap"]:
                out["error"] = "cap reached without ENOSPC"
                return
            try:
                await md.deliver(data)
            except OSError as exc:
                o = outcome(exc)
                out.update(errno=exc.errno, temporary=o.temporary, reply=o.reply,
                           exit_code=o.exit_code)  # fmt: skip
                break
            out["delivered"] += 1
        out["tmp_after_failure"] = os.listdir(os.path.join(md_path, "tmp"))
        found = scan(md_path)  # C1: every message complete
        out["complete"] = len(found)
        victim = sorted(os.listdir(os.path.join(md_path, "new")))[0]
        os.unlink(os.path.join(md_path, "new", victim))
        d = await md.deliver(make("after-delete", cfg["size"]))
        out["after_delete"] = d.name in os.listdir(os.path.join(md_path, "new"))
        out["complete_at_end"] = len(scan(md_path))

    try:
        asyncio.run(main())
    finally:
        subprocess.run(["umount", mnt], check=False)
    print(json.dumps(out))


def remount(dev: str, mnt: str, fstype: str, opts: str) -> None:
    """Unmount and mount again: the journal replay after a shutdown (a power cycle)."""
    subprocess.run(["umount", mnt], check=True)
    wait_released(dev)
    subprocess.run(["mount", "-t", fstype, "-o", opts, dev, mnt], check=True)
    os.stat(mnt)  # EIO here would mean the old, shut-down filesystem came back


def serve(parallel: int) -> None:
    """Fork one child per job read from stdin; print one result line per job."""
    jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    running: dict[int, tuple[dict[str, Any], int, list[bytes]]] = {}
    by_fd: dict[int, list[bytes]] = {}
    results: list[dict[str, Any]] = []

    def pump(timeout: float) -> None:
        # Drain the ack pipes while children run, so a chatty child never blocks on one.
        ready, _, _ = select.select(list(by_fd), [], [], timeout)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if data:
                by_fd[fd].append(data)

    def reap() -> None:
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                break
            pump(0.01)
        job, rfd, chunks = running.pop(pid)
        del by_fd[rfd]
        while data := os.read(rfd, 1 << 16):
            chunks.append(data)
        os.close(rfd)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        out = b"".join(chunks).decode("utf-8", "surrogateescape")
        results.append({"id": job["id"], "pid": pid, "signal": sig, "status": code, "acks": out})
        if job.get("remount"):
            remount(**job["remount"])

    for job in jobs:
        while len(running) >= parallel:
            reap()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(rfd)
            for fd in by_fd:
                os.close(fd)
            random.seed()
            job["ackfd"] = wfd
            try:
                run(job)
            except BaseException as exc:  # report, never fall back into the server loop
                os.write(wfd, f"CRASHED {type(exc).__name__}: {exc}\n".encode())
                os._exit(4)
            os._exit(0)
        os.close(wfd)
        chunks: list[bytes] = []
        running[pid] = (job, rfd, chunks)
        by_fd[rfd] = chunks
    while running:
        reap()
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "run":
        run(json.loads(sys.argv[2]))
    elif sys.argv[1] == "fill":
        fill(json.loads(sys.argv[2]))
    else:  # pragma: no cover
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
