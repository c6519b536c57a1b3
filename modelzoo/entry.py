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
    UserError → one line, exit 2; TrainingError (training cannot go on) → one line, exit 1. An error
    holding several problems (a params file's) prints one line each."""
    try:
        result = action()
    except UserError as e:
        _print_error(e)
        return 2
    except TrainingError as e:
        _print_error(e)
        return 1
    if isinstance(result, int):
        return result
    if result:
        print(result)
    return 0


def _print_error(e: Exception) -> None:
    for line in str(e).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
