"""Listening sockets: the address notation, Unix socket takeover rules and cleanup."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildrop._listen import Listener, bind, describe, parse_address, parse_hostport


def connects(path: Path) -> bool:
    """Whether a client can connect to the Unix socket at *path*."""
    with socket.socket(socket.AF_UNIX) as c:
        try:
            c.connect(str(path))
        except OSError:
            return False
    return True


def test_parse_address_forms() -> None:
    """HOST:PORT, [IPv6]:PORT and unix:PATH are told apart."""
    assert parse_address("127.0.0.1:24") == ("127.0.0.1", 24)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("unix:/run/m/lmtp") == "/run/m/lmtp"
    assert parse_address("unix:rel") == "rel"


@pytest.mark.parametrize(
    ("bad", "match"),
    [("unix:", "socket path"), ("unix:/a\0b", "NUL"), ("nohost", "HOST:PORT"), ("h:x", "HOST")],
)
def test_parse_address_rejects(bad: str, match: str) -> None:
    """Malformed addresses raise ValueError saying what a good one looks like."""
    with pytest.raises(ValueError, match=match):
        parse_address(bad)


@given(
    st.text(st.characters(codec="ascii", exclude_characters="[]:"), min_size=1),
    st.integers(0, 65535),
)
def test_parse_hostport_round_trips(host: str, port: int) -> None:
    """Any host without a colon and any port come back as given, bracketed or not."""
    assert parse_hostport(f"{host}:{port}") == (host, port)
    assert parse_hostport(f"[{host}]:{port}") == (host, port)


def test_tcp_bind_reports_the_port_and_cleans_up() -> None:
    """Port 0 binds a free port, reported in the notation; close() frees it."""
    (lsn,) = bind("127.0.0.1:0")
    try:
        assert lsn.address == describe(lsn.sock)
        host, port = parse_hostport(lsn.address)
        assert host == "127.0.0.1"
        assert port > 0
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        lsn.close()
    with pytest.raises(ConnectionRefusedError, match="Connection refused"):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_tcp_port_in_use_names_the_address() -> None:
    """A busy port fails with EADDRINUSE and a message naming the address."""
    (first,) = bind("127.0.0.1:0")
    try:
        with pytest.raises(OSError, match=rf"cannot listen on {first.address}: .*in use") as info:
            bind(first.address)
        assert info.value.errno == 98
    finally:
        first.close()


def test_unresolvable_host_names_the_address() -> None:
    """A host name that does not resolve fails naming the address."""
    with pytest.raises(OSError, match=r"cannot listen on no-such-host\.invalid:24"):
        bind("no-such-host.invalid:24")


def test_ipv6_is_bracketed() -> None:
    """[::1]:0 is reported in bracket notation."""
    try:
        (lsn,) = bind("[::1]:0")
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    lsn.close()
    assert lsn.address.startswith("[::1]:")


def test_unix_socket_is_created_and_removed(tmp_path: Path) -> None:
    """A Unix listener accepts connections and removes its socket file on close."""
    path = tmp_path / "lmtp"
    lsn = bind(f"unix:{path}")[0]
    assert lsn.address == f"unix:{path}"
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert connects(path)
    lsn.close()
    assert not path.exists()
    lsn.close()  # twice is harmless


def test_live_server_keeps_its_socket(tmp_path: Path) -> None:
    """Binding a path another server answers on is refused; that server keeps serving."""
    path = tmp_path / "lmtp"
    first = bind(f"unix:{path}")[0]
    try:
        with pytest.raises(OSError, match=rf"unix:{path}: another server is listening"):
            bind(f"unix:{path}")
        assert connects(path)
    finally:
        first.close()
    assert not path.exists()


def test_live_server_with_a_full_backlog_is_still_live(tmp_path: Path) -> None:
    """A server that answers too slowly (its backlog full) is live, not stale."""
    path = tmp_path / "lmtp"
    first = bind(f"unix:{path}", backlog=0)[0]
    clients = []
    try:
        for _ in range(8):  # fill the backlog: later connects would block
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            clients.append(c)
            try:
                c.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(OSError, match="another server is listening"):
            bind(f"unix:{path}")
    finally:
        for c in clients:
            c.close()
        first.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket nobody listens on (a dead server's) is replaced."""
    path = tmp_path / "lmtp"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    lsn = bind(f"unix:{path}")[0]  # without the removal, bind() would fail: EADDRINUSE
    try:
        assert connects(path)
    finally:
        lsn.close()
    assert not path.exists()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_non_socket_is_refused_and_left_alone(tmp_path: Path, kind: str) -> None:
    """A file, directory, symlink or FIFO at the path is never replaced."""
    path = tmp_path / "lmtp"
    if kind == "file":
        path.write_text("keep me")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        (tmp_path / "target").write_text("keep me")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    before = path.lstat()
    with pytest.raises(FileExistsError, match=rf"unix:{path}: .* is not a socket"):
        bind(f"unix:{path}")
    after = path.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["lmtp", "target"] if kind == "symlink" else ["lmtp"]
    )


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    """A socket in a missing directory fails naming both; nothing is created."""
    path = tmp_path / "run" / "maildrop" / "lmtp"
    with pytest.raises(FileNotFoundError, match=rf"unix:{path}: directory {path.parent} does not"):
        bind(f"unix:{path}")
    assert os.listdir(tmp_path) == []


def test_bind_error_names_the_path(tmp_path: Path) -> None:
    """An error from bind() itself (a path too long for sun_path) names the address."""
    path = tmp_path / ("x" * 120)
    with pytest.raises(OSError, match=rf"cannot listen on unix:{path}"):
        bind(f"unix:{path}")
    assert os.listdir(tmp_path) == []


def test_unprobeable_socket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket we may not connect to (EACCES) is refused, naming the path, not removed."""
    path = tmp_path / "lmtp"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.close()

    def denied(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    with pytest.raises(PermissionError, match=rf"unix:{path}: cannot probe {path}"):
        bind(f"unix:{path}")
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_socket_removed_while_probed_is_no_obstacle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale socket that vanishes between the check and the probe: bind goes ahead."""
    path = tmp_path / "lmtp"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    real = socket.socket.connect

    def vanish(self: socket.socket, address: object) -> None:
        os.unlink(path)
        real(self, address)

    monkeypatch.setattr(socket.socket, "connect", vanish)
    lsn = bind(f"unix:{path}")[0]
    monkeypatch.undo()
    assert connects(path)
    lsn.close()


def test_unreadable_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An lstat error other than a missing file is reported with the address."""

    def denied(path: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(PermissionError, match=rf"cannot listen on unix:{tmp_path}/lmtp"):
        bind(f"unix:{tmp_path}/lmtp")


def test_close_leaves_a_replaced_socket(tmp_path: Path) -> None:
    """close() removes the socket only while it is still the one bound (same inode)."""
    path = tmp_path / "lmtp"
    old = bind(f"unix:{path}")[0]
    old.sock.close()  # as if this server died: its socket is stale
    new = bind(f"unix:{path}")[0]  # a successor replaces it
    try:
        old.close()
        assert connects(path), "the successor's socket was removed"
    finally:
        new.close()
    assert not path.exists()


def test_close_tolerates_a_removed_socket_or_directory(tmp_path: Path) -> None:
    """close() after someone removed the socket (or its directory) raises nothing."""
    d = tmp_path / "run"
    d.mkdir()
    lsn = bind(f"unix:{d}/lmtp")[0]
    os.unlink(d / "lmtp")
    os.rmdir(d)
    lsn.close()


def test_relative_unix_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path binds in the current directory."""
    monkeypatch.chdir(tmp_path)
    lsn = bind("unix:lmtp")[0]
    assert lsn.address == "unix:lmtp"
    lsn.close()
    assert os.listdir(tmp_path) == []


def test_listener_of_a_handed_socket_never_removes_files(tmp_path: Path) -> None:
    """A Listener made without a path (a handed-over socket) only closes the socket."""
    lsn = bind(f"unix:{tmp_path}/lmtp")[0]
    handed = Listener(lsn.sock)
    handed.close()
    assert (tmp_path / "lmtp").exists()
    lsn.close()
    assert not (tmp_path / "lmtp").exists()
