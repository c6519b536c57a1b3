"""One way for every entry point (run.py and the tools) to turn a user's mistake into one line
on stderr and exit code 2: a bad flag, a bad file, an output that cannot be written."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from modelzoo.errors import TrainingError, UserError


class OneLineParser(argparse.ArgumentParser):
    """Flag errors are one line and exit code 2, like every other user error (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_entry(action: Callable[[], str | int | None]) -> int:
    """Call ``action``; a returned string is its one-line summary (exit 0), an int its exit code.
    UserError → one line, exit 2; TrainingError (training cannot go on) → one line, exit 1."""
    try:
        result = action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if result:
        print(result)
    return 0
