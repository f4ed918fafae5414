"""The per-test seed (conftest.py) is stable: the same inputs on every run, so a rare failure can be replayed."""
import os
import subprocess
import sys

import torch

from conftest import ROOT, stable_seed

NODE = "tests/test_example.py::test_something[7]"


def _seeds_in_processes(*hash_seeds: str) -> list[int]:
    """stable_seed(NODE) computed by fresh Pythons (run in parallel), each salting str hashes with one hash_seed."""
    code = f"from conftest import stable_seed; print(stable_seed({NODE!r}))"  # run in tests/: conftest importable
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=h),
                              cwd=os.path.join(ROOT, "tests"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in hash_seeds]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [int(out) for out, _ in outs]


def test_seed_does_not_depend_on_the_process_hash_salt():
    assert _seeds_in_processes("1", "2") == [stable_seed(NODE)] * 2
    assert 0 <= stable_seed(NODE) < 2 ** 31 and stable_seed(NODE) != stable_seed(NODE + "x")


def test_each_test_starts_from_its_stable_seed(request):
    assert torch.initial_seed() == stable_seed(request.node.nodeid)
