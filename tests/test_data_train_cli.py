"""train_small.py on real-data shards: runs to the end, writes its outputs, counts bad samples, clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_data_shards import build_dirty, clean_shards, write_tar
from minifilip.train import main
from conftest import ROOT


def run(*args):
    """train_small.py in a subprocess with one intra-op thread: on a busy 2-core CI box, oversubscribed
    threads make a tiny step take seconds instead of milliseconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_small.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


FAST = ["--steps", "20", "--batch-size", "8", "--val-size", "6", "--log-every", "10", "--save-every", "10",
        "--warmup", "2", "--num-workers", "1"]


def test_trains_on_dirty_shards_and_writes_outputs(tmp_path):
    train = build_dirty(tmp_path / "train")  # '.../{00000..00002}.tar', 12 good samples, 8 bad, 6 converted
    val = clean_shards(tmp_path / "val", n_shards=2, per_shard=4)
    out = tmp_path / "run"
    proc = run(*FAST, "--train-data", train, "--val-data", val, "--out", str(out))
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png", "final.json", "vocab.json"} <= set(os.listdir(out))
    final = json.loads((out / "final.json").read_text())
    assert final["val"]["n"] == 6 and final["val_source"] == val and final["train_data"] == train
    # 20 steps x 8 = 160 samples = 12 epochs of the 13 good ones (no pixel limit here): each bad one met 10+ times
    assert final["bad_samples"]["decode_error"] >= 2 * 10 and final["converted_samples"]["mode_CMYK"] >= 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[-1]["epoch"] > 8
    assert set(rows[-1]["bad_samples"]) >= {"decode_error", "truncated_tar", "no_caption", "no_image"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    vocab = json.loads((out / "vocab.json").read_text())
    assert ckpt["tokenizer"]["itos"] == vocab["itos"] and "caption" in vocab["itos"]
    assert ckpt["config"]["vocab_size"] == len(vocab["itos"]) and ckpt["args"]["train_data"] == train
    assert "samples per epoch" in proc.stdout


def test_without_val_data_evaluates_on_train_samples_with_a_warning(tmp_path, capsys, one_thread):
    train = clean_shards(tmp_path / "train", n_shards=2, per_shard=6)
    out = tmp_path / "run"
    assert main(["--steps", "2", "--batch-size", "4", "--val-size", "5", "--warmup", "1", "--num-workers", "0",
                 "--train-data", train, "--out", str(out)]) == 0  # in process: no second torch import
    assert "warning: no --val-data" in capsys.readouterr().out
    final = json.loads((out / "final.json").read_text())
    assert final["val"]["n"] == 5 and final["val_source"].startswith("train")


@pytest.mark.parametrize("case, message", [
    ("nomatch", "matches no file"),
    ("missing", "do not exist"),
    ("allbad", "no usable image-text pair"),
    ("valonly", "--val-data needs --train-data"),
])
def test_bad_data_stops_before_training_with_one_line(tmp_path, capsys, case, message):
    write_tar(tmp_path / "bad.tar", [m for i in range(6) for m in ((f"{i}.jpg", b"garbage"), (f"{i}.txt", b"c"))])
    clean_shards(tmp_path, n_shards=1, per_shard=2)  # 00000.tar exists, 00001..00003 do not
    spec = {"nomatch": str(tmp_path / "nothing-*.tar"), "missing": str(tmp_path / "{00000..00003}.tar"),
            "allbad": str(tmp_path / "bad.tar")}.get(case)
    args = ["--train-data", spec] if spec else ["--val-data", str(tmp_path / "bad.tar")]
    assert main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_small.py: error:") and message in lines[0], lines
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_with_real_data_restarts_the_stream_and_keeps_counts(tmp_path, capsys, one_thread):
    train = build_dirty(tmp_path / "train")
    out = str(tmp_path / "run")
    common = ["--batch-size", "4", "--val-size", "4", "--warmup", "1", "--num-workers", "0", "--log-every", "1"]
    assert main([*common, "--steps", "6", "--stop-at", "4", "--train-data", train, "--out", out]) == 0
    counts_at_4 = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["data_counts"]
    assert counts_at_4["decode_error"] >= 2
    assert main(["--resume", out]) == 0
    assert "resuming" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["train_data"] == train
    assert ckpt["data_counts"]["decode_error"] >= counts_at_4["decode_error"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
