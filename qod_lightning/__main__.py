"""``python -m qod_lightning``."""

from qod_lightning.cli import main

raise SystemExit(main())
