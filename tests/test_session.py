"""The delivery session (``maildrop._session``) driven as a model of its state machine."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from maildrop import Maildir
from maildrop._session import DeliverySession
from maildrop._state import Phase


def _files(root: Path, sub: str) -> list[str]:
    d = root / sub
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@settings(max_examples=30, stateful_step_count=8, deadline=None)
class SessionMachine(RuleBasedStateMachine):
    """Any sequence of calls on one session moves it as ``_state`` says and leaves the disk
    in the matching shape: nothing before commit, one message after, nothing after abort."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="maildrop-session-"))
        self.loop = asyncio.new_event_loop()
        self.session: DeliverySession = Maildir(self.dir / "m").open_delivery()
        self.model = Phase.WRITING
        self.written = b""

    def teardown(self) -> None:
        self.loop.close()
        shutil.rmtree(self.dir)

    def run(self, coro: object) -> None:
        self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @rule(data=st.binary(min_size=1, max_size=64))
    def write(self, data: bytes) -> None:
        """write() is accepted only while writing."""
        if self.model is Phase.WRITING:
            self.run(self.session.write(data))
            self.written += data
        else:
            with pytest.raises(RuntimeError, match="cannot write"):
                self.run(self.session.write(data))

    @rule(action=st.sampled_from(["commit", "stage"]))
    def finish(self, action: str) -> None:
        """commit() makes the message durable, stage() keeps it in tmp/: once, while writing."""
        call = getattr(self.session, action)
        if self.model is Phase.WRITING:
            self.run(call())
            self.model = Phase.DURABLE if action == "commit" else Phase.STAGED
        else:
            with pytest.raises(RuntimeError, match=f"cannot {action}"):
                self.run(call())

    @rule()
    def abort(self) -> None:
        """abort() ends any unfinished request; a durable message stays."""
        self.run(self.session.abort())
        if self.model is not Phase.DURABLE:
            self.model = Phase.ABORTED

    @invariant()
    def phase_and_disk_agree(self) -> None:
        """The session's one state is the model's, and the disk shows exactly that."""
        assert self.session._phase is self.model
        assert self.session.closed == (self.model in (Phase.DURABLE, Phase.ABORTED))
        root = self.dir / "m"
        if self.model is Phase.DURABLE:
            (name,) = _files(root, "new")
            assert (root / "new" / name).read_bytes() == self.written
            assert _files(root, "tmp") == []
        elif self.model is Phase.ABORTED:
            assert _files(root, "new") == _files(root, "tmp") == []
        elif self.model is Phase.STAGED:
            assert len(_files(root, "tmp")) == 1
            assert _files(root, "new") == []
        else:
            assert _files(root, "new") == []


TestSessionMachine = SessionMachine.TestCase
