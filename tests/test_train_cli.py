"""train_small.py end to end in a subprocess: outputs, resume, and clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from minifilip import FILIP
from minifilip.checkpoint import load_model
from minifilip.data.builtin import BuiltinTrainStream, builtin_val_pairs
from minifilip.metrics import retrieval_metrics

FAST = ["--steps", "4", "--batch-size", "8", "--val-size", "16", "--log-every", "1", "--save-every", "2",
        "--warmup", "1"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_small.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("loss", ["filip", "clip"])
def test_runs_and_writes_all_outputs(tmp_path, loss):
    out = tmp_path / "run"
    proc = run(*FAST, "--loss", loss, "--out", str(out))
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png", "final.json"} <= set(os.listdir(out))
    final = json.loads((out / "final.json").read_text())
    assert set(final["val"]) >= {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "chance_R@1", "n"}
    assert final["val"]["n"] == 16 and final["loss"] == loss and final["preset"] == "tiny"
    assert "train_seconds" in final and "image -> text" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["loss"] == loss and ckpt["tokenizer"]["itos"][0] == "[PAD]"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    check_logged_numbers(out, rows, final)


def check_logged_numbers(out, rows, final):
    """The numbers in the outputs, not just the files, each recomputed another way."""
    # warm-up 1, then cosine over steps 1..4: the lr of steps 0..3 is 1, 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3])
    model, tok, _ = load_model(out / "checkpoint.pt")
    # step 1's loss: the seed-0 initial model on the first built-in batch (dropout 0: train mode is deterministic)
    torch.manual_seed(0)
    initial = FILIP(model.config).train()
    images, captions, _keys, _counts = next(iter(BuiltinTrainStream(8, 64, seed=0)))
    assert rows[0]["loss"] == pytest.approx(initial.loss(images, tok.encode(captions, 24)).item(), rel=1e-5)
    # final.json: the saved model's retrieval on the first 16 built-in val pairs
    images, captions, _ = builtin_val_pairs(16, 64, seed=0)
    s_i2t, s_t2i = model.pairwise_scores(*model.encode_image(images), *model.encode_text(tok.encode(captions, 24)))
    assert final["val"] == pytest.approx(retrieval_metrics(s_i2t, s_t2i, captions))


def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "run"
    run(*FAST, "--out", str(out))
    proc = run("--resume", str(out), "--steps", "6")
    assert "resuming" in proc.stdout and "at step 4/6" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    """4 steps, then 2 more from the checkpoint == 6 steps straight (same data, same optimizer state, and with
    dropout on, the same random state: resume must restore it)."""
    run(*FAST, "--dropout", "0.2", "--steps", "6", "--out", str(tmp_path / "straight"))
    proc = run(*FAST, "--dropout", "0.2", "--steps", "6", "--out", str(tmp_path / "split"), "--stop-at", "4")
    assert "stopped at step 4/6" in proc.stdout and not (tmp_path / "split" / "final.json").exists()
    run("--resume", str(tmp_path / "split"))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--batch-size", "1"], "at least 2"),
    (["--preset", "huge"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--token-keep-ratio", "1.5"], "token_keep_ratio"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--lr", "-1"], "error"),
])
def test_bad_flags_give_one_line_errors(args, message):
    proc = run(*args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_help_explains_flags():
    out = run("--help").stdout
    for flag in ("--preset", "--loss", "--steps", "--batch-size", "--lr", "--seed", "--device", "--precision",
                 "--out", "--resume"):
        assert flag in out


def test_gradient_caching_and_token_selection_flags_train(tmp_path):
    """--micro-batch-size and --token-keep-ratio reach the loop: same data, close first losses, saved in config."""
    plain = run(*FAST, "--steps", "2", "--out", str(tmp_path / "plain"))
    cached = run(*FAST, "--steps", "2", "--micro-batch-size", "3", "--out", str(tmp_path / "cached"))
    assert plain.returncode == cached.returncode == 0
    first = lambda d: json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first("plain") - first("cached")) < 1e-4  # exact full-batch loss with micro-batches of 3
    run(*FAST, "--steps", "2", "--token-keep-ratio", "0.5", "--out", str(tmp_path / "keep"))
    ckpt = torch.load(tmp_path / "keep" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["token_keep_ratio"] == 0.5
