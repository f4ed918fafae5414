"""Output folders and files of the CLIs: never overwrite or mix into an earlier run by accident.

A run folder (train_small.py --out) holds the files listed in RUN_FILES. Starting a new run in a folder that
already holds one is refused unless the user says --resume (continue it) or --overwrite (start over: the old
run's files are removed first, other files in the folder are left alone). A run killed while saving can leave a
hidden `.tmp-checkpoint.pt-XXXX` (see checkpoint.atomic_torch_save); those are removed when a run starts or
resumes in the folder.

Everything here only checks or touches paths; the checks run before any work, so a wrong path costs nothing.
"""
from __future__ import annotations

import glob
import os

RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "loss.png", "alignment.png", "final.json", "vocab.json")
STALE_TEMP_PATTERN = ".tmp-*.pt-*"  # what atomic_torch_save names its temporary files (checkpoint.pt, best.pt)


def check_output_folder(path: str, flag: str = "--out") -> None:
    """Raise ValueError if `path` cannot be (or become) a folder: it is a file, or a parent of it is."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder; choose a folder name")
    _check_parents(path, flag)


def check_output_file(path: str, flag: str, example: str = "out.json") -> None:
    """Raise ValueError if a file cannot be written at `path`: it is a folder, or a parent of it is a file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {os.path.join(path, example)})")
    _check_parents(os.path.dirname(os.path.abspath(path)), flag, path)


def _check_parents(folder: str, flag: str, target: str | None = None) -> None:
    """The nearest existing ancestor of `folder` must be a folder (else makedirs fails half-way)."""
    current = os.path.abspath(folder)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    if not os.path.isdir(current):
        raise ValueError(f"{flag} {target or folder}: {current} is a file, not a folder")


def existing_run_files(folder: str) -> list[str]:
    """The run files (RUN_FILES) already present in `folder`."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]


def check_new_run(folder: str, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless overwrite (then start_run removes it)."""
    check_output_folder(folder)
    found = existing_run_files(folder) if os.path.isdir(folder) else []
    if found and not overwrite:
        raise ValueError(f"{folder} already holds a run ({', '.join(found)}): continue it with --resume {folder}, "
                         f"or start over with --overwrite (removes those files first)")


def remove_stale_temps(folder: str) -> int:
    """Delete temporary checkpoint files a killed save left behind in `folder`; returns how many."""
    stale = glob.glob(os.path.join(glob.escape(folder), STALE_TEMP_PATTERN))
    for path in stale:
        os.remove(path)
    return len(stale)


def start_run(folder: str, overwrite: bool = False, resume: bool = False) -> None:
    """Create (or, with overwrite, empty of run files) the run folder and clean stale temp files.
    Call check_new_run first for a new run; resume keeps everything but the stale temps."""
    if overwrite and not resume:
        for name in existing_run_files(folder):
            os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)
    n = remove_stale_temps(folder)
    if n:
        print(f"removed {n} temporary checkpoint file(s) left in {folder} by an interrupted save")
