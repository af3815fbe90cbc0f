"""``python -m maildrop``: the ``maildrop`` command."""

from .cli import main

raise SystemExit(main())
