"""Large messages stream in bounded memory (measured in a fresh child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import asyncio, json, resource, sys
    from maildrop import Maildir

    SIZE = int(sys.argv[2])
    CHUNK = 64 * 1024

    async def chunks():
        block = bytes(range(256)) * (CHUNK // 256)
        for _ in range(SIZE // CHUNK):
            yield block

    async def main():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        d = await Maildir(sys.argv[1], fsync=False).deliver(chunks())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"size": d.size, "growth_kib": after - before}))

    asyncio.run(main())
    """
)


def test_512_mib_stream_keeps_rss_flat(tmp_path: Path) -> None:
    """Streaming 512 MiB from an async iterator raises peak RSS by at most 16 MiB."""
    size = 512 * 1024 * 1024
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "m"), str(size)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["size"] == size
    assert result["growth_kib"] <= 16 * 1024, result
    (f,) = (tmp_path / "m" / "new").iterdir()
    assert f.stat().st_size == size
    f.unlink()  # one big file: no inode-allocator penalty for later tests
