"""``python -m prewarm`` is the ``prewarm`` command (used to start worker processes)."""

from prewarm.cli import main

main()
