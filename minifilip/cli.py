"""What the command-line tools share: an argument parser that reports a bad flag in one line, one-line errors,
and checks that turn bad flag values into such errors before any work starts.

    p = Parser(prog="python -m minifilip.evaluate", description=...)   # train, evaluate and visualize use it
    ...
    except (ValueError, FileNotFoundError) as e:
        print(f"{p.prog}: error: {one_line(e)}", file=sys.stderr)
"""
from __future__ import annotations

import argparse
import math

import torch


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line ("prog: error: ... (see --help)", exit code 2) instead of the
    usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(e: BaseException) -> str:
    """An error message on one line (some library errors span several)."""
    return " ".join(str(e).split())


def check_number(flag: str, value: float, positive: bool = False, minimum: float | None = None) -> None:
    """Raise ValueError unless `value` is finite (and > 0 if positive, >= minimum if given).
    Comparisons alone let nan through (nan <= 0 is False), hence the explicit isfinite."""
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def parse_device(name: str) -> torch.device:
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ... -> torch.device, or ValueError in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where it says something: not for None, not where the help already describes
    the default in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return super()._get_help_string(action)

