"""``python -m drills``: the fault drills (``python -m drills.faults --help``)."""

from __future__ import annotations

from .faults import main

if __name__ == "__main__":
    raise SystemExit(main())
