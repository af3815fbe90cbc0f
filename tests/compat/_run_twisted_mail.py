"""Run Twisted's own ``twisted.mail.test.test_mail`` under asyncioreactor; print JSON outcomes.

Usage: ``python _run_twisted_mail.py (stock|shim) [TESTNAME-PREFIX]``, in a scratch working
directory (trial writes ``_trial_temp`` there). With ``shim``, the compat task replaces
Twisted's before ``test_mail`` is imported, so its ``FailingMaildirMailboxAppendMessageTask``
subclasses the shim. The reactor is process-global, so this always runs in its own process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import asyncioreactor

asyncioreactor.install()

import twisted.mail.maildir  # noqa: E402 - after the reactor, on purpose

import compat  # noqa: E402

mode = sys.argv[1]
if mode == "shim":
    twisted.mail.maildir._MaildirMailboxAppendMessageTask = compat.MaildirMailboxAppendMessageTask  # type: ignore[misc]
    twisted.mail.maildir.MaildirMailbox.AppendFactory = compat.MaildirMailboxAppendMessageTask  # type: ignore[assignment]
elif mode != "stock":
    raise SystemExit(f"unknown mode {mode!r}")

import twisted.mail.test.test_mail as test_mail  # noqa: E402
from twisted.trial import reporter, runner  # noqa: E402

mro = test_mail.FailingMaildirMailboxAppendMessageTask.__mro__
assert (compat.MaildirMailboxAppendMessageTask in mro) == (mode == "shim"), mro


class Recorder(reporter.Reporter):
    """A reporter that remembers each test's outcome."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self.outcomes[test.id()] = "pass"

    def addFailure(self, test: Any, fail: Any) -> None:
        super().addFailure(test, fail)
        self.outcomes[test.id()] = "fail"

    def addError(self, test: Any, error: Any) -> None:
        super().addError(test, error)
        self.outcomes.setdefault(test.id(), "error")

    def addSkip(self, test: Any, reason: Any) -> None:
        super().addSkip(test, reason)
        self.outcomes[test.id()] = "skip"

    def addExpectedFailure(self, test: Any, error: Any, todo: Any = None) -> None:
        super().addExpectedFailure(test, error, todo)
        self.outcomes[test.id()] = "xfail"

    def addUnexpectedSuccess(self, test: Any, todo: Any = None) -> None:
        super().addUnexpectedSuccess(test, todo)
        self.outcomes[test.id()] = "xpass"


recorder: list[Recorder] = []


def factory(*args: Any, **kwargs: Any) -> Recorder:
    r = Recorder(*args, **kwargs)
    recorder.append(r)
    return r


suite = runner.TestLoader().loadModule(test_mail)
if len(sys.argv) > 2:
    suite = runner.TestLoader().loadByName(f"twisted.mail.test.test_mail.{sys.argv[2]}")
with open("trial.log", "w") as log:
    runner.TrialRunner(factory, stream=log).run(suite)
print(json.dumps(recorder[0].outcomes, sort_keys=True))
