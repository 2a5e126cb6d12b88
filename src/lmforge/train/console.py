"""The one way training code speaks to the user: a line written around the progress bar, never a bare print()."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def report(message: object, *, stderr: bool = False) -> None:
    """Write `message` (a PEFT summary, skipped input lines, a notice) on stdout, or stderr, as a line of its own
    that leaves a running progress bar intact."""
    tqdm.write(str(message), file=sys.stderr if stderr else sys.stdout)
