"""What the command-line tools share: an argument parser that reports a bad flag in one line, and one-line errors.

    p = Parser(prog="python -m minifilip.evaluate", description=...)   # train, evaluate and visualize use it
    ...
    except (ValueError, FileNotFoundError) as e:
        print(f"{p.prog}: error: {one_line(e)}", file=sys.stderr)
"""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line ("prog: error: ... (see --help)", exit code 2) instead of the
    usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(e: Exception) -> str:
    """An error message on one line (some library errors span several)."""
    return " ".join(str(e).split())
