"""`python -m serve_app.batch`: the same command as `sam3-batch`."""

from __future__ import annotations

import sys

from serve_app.batch.cli import main

sys.exit(main())
