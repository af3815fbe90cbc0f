"""``python -m benchmarks``: the side-by-side comparison (see ``benchmarks/compare.py``)."""

from .compare import main

raise SystemExit(main())
