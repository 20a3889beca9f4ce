"""Where the commands print: one console for tables and lines, one for errors.

A log file or CI gets 140 columns and unwrapped lines: Rich's default of 80 folds tables into
unreadable cells.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 140, soft_wrap=not sys.stdout.isatty())
errors = Console(stderr=True, soft_wrap=True)
