"""The mailbox the append task delivers into."""

from __future__ import annotations

from pathlib import Path

import pytest

import compat

from ..conftest import listing


def test_creating_a_mailbox_does_no_io(tmp_path: Path) -> None:
    """A new MaildirMailbox creates nothing and lists nothing; its repr names the path."""
    mbox = compat.MaildirMailbox(str(tmp_path / "Maildir"))
    assert repr(mbox) == f"compat.MaildirMailbox({str(tmp_path / 'Maildir')!r})"
    assert mbox.list == []
    assert not (tmp_path / "Maildir").exists()


@pytest.mark.asyncio
async def test_append_message_uses_the_append_factory_and_lists_the_path(tmp_path: Path) -> None:
    """appendMessage runs AppendFactory's task and lists the message's path, typed like path."""
    started: list[object] = []

    class Recording(compat.MaildirMailboxAppendMessageTask):
        def startUp(self) -> None:
            started.append(self)
            super().startUp()

    mbox = compat.MaildirMailbox(str(tmp_path / "Maildir").encode())
    mbox.AppendFactory = Recording
    assert await compat.as_future(mbox.appendMessage(b"Subject: box\n\nbody\n")) is None
    assert len(started) == 1
    (name,) = listing(tmp_path / "Maildir")["new"]
    assert mbox.list == [str(tmp_path / "Maildir" / "new" / name).encode()]
