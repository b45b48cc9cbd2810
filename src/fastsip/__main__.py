"""``python -m fastsip``: the same as the ``fastsip`` command (see :mod:`fastsip.cli`)."""

from __future__ import annotations

import sys

from fastsip.cli import main

sys.exit(main())
