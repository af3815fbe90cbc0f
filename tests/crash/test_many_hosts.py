"""Many hosts, one mailbox: 4 processes in 2 UTS namespaces deliver 20,000 messages.

This is how an NFS-shared maildir sees its writers: several machines (hostnames) and
several processes per machine, each with its own pid and counter, all creating names in
the same ``tmp/`` and ``new/`` at the same moment. Every acked message must be present,
complete and distinct, under the name it was acked with, and nothing may be clobbered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ._harness import CHILD, FIGURES, PY, acks, require_root, require_tool
from ._msg import scan

pytestmark = pytest.mark.crash

HOSTS = ["alpha.example", "beta.example"]
PER_PROCESS = 5000


def test_four_processes_two_hosts_one_maildir(work: Path) -> None:
    """20,000 concurrent deliveries from 2 hostnames x 2 processes: all there, no clobber."""
    require_root("setting a hostname in a UTS namespace")
    require_tool("unshare")
    md = work / "shared"
    host_ns = os.readlink("/proc/self/ns/uts")
    plan = [["bytes", 100], ["bytes", 700], ["bytes", 1900], ["bytes", 40]]
    procs = []
    for h, host in enumerate(HOSTS):
        jobs = [
            {"id": f"{h}.{p}", "md": str(md), "hostname": host, "host_uts_ns": host_ns,
             "tag": f"h{h}p{p}", "plan": plan, "repeat": PER_PROCESS // len(plan),
             "concurrency": 16}
            for p in range(2)
        ]  # fmt: skip
        spec = work / f"jobs-{h}.jsonl"
        spec.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        # One UTS namespace per host; the fork server's two children share it.
        with open(spec) as stdin:
            procs.append(
                subprocess.Popen(
                    ["unshare", "-u", PY, CHILD, "serve", "2"],
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
    acked: dict[str, str] = {}
    try:
        for h, proc in enumerate(procs):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            for line in out.splitlines():
                r = json.loads(line)
                assert r["status"] == 0, r
                got = acks(r["acks"])
                assert len(got) == PER_PROCESS, (r["id"], len(got))
                assert all(name.endswith("." + HOSTS[h]) for name in got.values())
                acked.update(got)
    finally:
        for proc in procs:
            if proc.poll() is None:  # a failed assertion: stop the server and its children
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    total = len(HOSTS) * 2 * PER_PROCESS
    assert len(acked) == total
    assert len(set(acked.values())) == total, "two deliveries were acked with one name"
    found = scan(md)  # C1, and no id twice
    assert len(found) == total
    assert os.listdir(md / "tmp") == []
    for ident, name in acked.items():
        assert found[ident] == f"new/{name}", ident  # each under its own name: no clobber
    FIGURES["many_hosts_messages"] += total
