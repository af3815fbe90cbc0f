"""compat: Twisted's maildir append task (IConsumer + Deferred), backed by maildrop."""

__all__: list[str] = []
