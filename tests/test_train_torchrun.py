"""train_small.py under torchrun (2 CPU processes, gloo) against the plain one-process run of the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# dropout 0 and no token selection: the two runs then compute the same global loss, only split differently
FAST = ["--steps", "4", "--batch-size", "8", "--val-size", "8", "--log-every", "1", "--save-every", "2",
        "--warmup", "1", "--device", "cpu"]


def run(*args, procs=0):
    """procs=0: plain `python train_small.py`; procs=N: `python -m torch.distributed.run` with N processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs else []
    proc = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "train_small.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def params(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def rel_err(a, b):
    """Relative error of all parameters taken as one vector. (Per tensor, the key part of each qkv bias has an
    exactly-zero true gradient: AdamW turns its rounding noise into full-size steps of random sign, so those
    few entries differ between any two summation orders, one process or two.)"""
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    return float(num.sqrt() / sum((b[k].double() ** 2).sum() for k in b).sqrt())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run(*FAST, "--out", str(out))
    return out


def test_two_processes_train_like_one(one_process, tmp_path):
    out = tmp_path / "two"
    proc = run(*FAST, "--out", str(out), procs=2)
    assert proc.stdout.count("held-out retrieval") == 1 and proc.stdout.count("minifilip tiny") == 1  # rank 0 only
    assert "2 processes (gloo), batch 8 = 2 x 4" in proc.stdout
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-4)
    assert rel_err(params(out), params(one_process)) <= 1e-4
    assert json.loads((out / "final.json").read_text())["batch_size"] == 8


def test_micro_batches_and_resume_continue_the_curve(one_process, tmp_path):
    """Gradient caching (micro-batches of 3 of each rank's 4 pairs) stopped after 2 steps and resumed with 2
    processes: all 4 losses and the final weights are those of the one-process run."""
    out = tmp_path / "two"
    proc = run(*FAST, "--micro-batch-size", "3", "--stop-at", "2", "--out", str(out), procs=2)
    assert "stopped at step 2/4" in proc.stdout and not (out / "final.json").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2 and not torch.equal(*ckpt["rng_ranks"])  # dropout streams differ by rank
    proc = run("--resume", str(out), procs=2)
    assert "resuming" in proc.stdout and "at step 2/4" in proc.stdout
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-4)
    assert rel_err(params(out), params(one_process)) <= 1e-4


def test_uneven_split_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train_small.py"), *FAST, "--batch-size", "9", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode != 0
    assert "train_small.py: error: --batch-size 9 must be divisible by the number of processes (2)" in proc.stderr
