"""train_small.py with bad flags, reused folders, killed saves and hostile checkpoints: one-line errors, no lost
work. In process (main(argv)), tiny runs of 2 steps."""
import json
import os
import stat

import pytest
import torch

from minifilip.train import build_parser, main

FAST = ["--steps", "2", "--batch-size", "4", "--val-size", "4", "--log-every", "1", "--save-every", "1",
        "--warmup", "1", "--eval-batch-size", "4"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # every test here: a tiny step on a busy 2-core box is faster with one thread
    yield


def fails(argv, capsys, *messages):
    """main(argv) exits 2 with exactly one stderr line holding every message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_small.py: error:"), err
    for m in messages:
        assert m in err[0], err[0]
    return err[0]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out)]) == 0
    return out


def test_reusing_out_is_refused_unless_resume_or_overwrite(run_dir, capsys):
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    fails([*FAST, "--out", str(run_dir)], capsys, "already holds a run", "--resume", "--overwrite")
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before  # nothing touched
    (run_dir / "notes.txt").write_text("mine")
    assert main([*FAST, "--steps", "3", "--out", str(run_dir), "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the new run's log only, not appended to the old one
    assert (run_dir / "notes.txt").read_text() == "mine"  # only run files are removed
    fails(["--resume", str(run_dir), "--overwrite"], capsys, "--overwrite", "cannot be changed")


def test_stale_temp_checkpoints_are_removed_and_saves_are_readable(run_dir, capsys):
    stale = run_dir / ".tmp-checkpoint.pt-abc123"  # what a kill -9 during atomic_torch_save leaves
    stale.write_bytes(b"half a checkpoint")
    assert main(["--resume", str(run_dir), "--steps", "3"]) == 0
    assert not stale.exists() and "removed 1 temporary checkpoint" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(os.stat(run_dir / "checkpoint.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(run_dir / "final.json").st_mode) == 0o666 & ~umask


def test_stale_temp_removed_when_a_new_run_starts(tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / ".tmp-checkpoint.pt-x9").write_bytes(b"x")
    (out / ".tmp-other-keep").write_bytes(b"x")  # not ours: left alone
    assert main([*FAST, "--steps", "1", "--out", str(out)]) == 0
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == [".tmp-other-keep"]


def test_flags_that_resume_would_ignore_are_rejected(run_dir, capsys):
    fails(["--resume", str(run_dir), "--lr", "5", "--batch-size", "64"], capsys, "--batch-size, --lr",
          "cannot be changed")
    fails(["--resume", str(run_dir), "--batch", "64"], capsys, "--batch-size")  # an abbreviation too
    fails(["--resume", str(run_dir), "--out", "elsewhere"], capsys, "--out")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 2  # untouched


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--stop-at", "-1"], "--stop-at must be a positive step"),
    (["--stop-at", "0"], "--stop-at must be a positive step"),
    (["--device", "bogus"], "is not a device"),
])
def test_bad_values_fail_before_any_folder_exists(tmp_path, capsys, flags, message):
    fails([*FAST, *flags, "--out", str(tmp_path / "run")], capsys, message)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails([*FAST, "--out", str(tmp_path / "f")], capsys, "is a file, not a folder")
    fails([*FAST, "--out", str(tmp_path / "f" / "run")], capsys, "is a file, not a folder")


def test_nan_loss_is_one_line_with_a_fitting_hint(tmp_path, capsys):
    line = fails([*FAST, "--steps", "4", "--lr", "1e30", "--warmup", "0", "--precision", "fp32",
                  "--out", str(tmp_path / "run")], capsys, "loss became nan", "lower --lr")
    assert "--precision fp32" not in line  # the run already is fp32


def test_resume_with_weights_that_do_not_fit_the_config(run_dir, capsys):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.dim() == 2)
    ckpt["model"][key] = torch.zeros(7, 3)
    torch.save(ckpt, run_dir / "checkpoint.pt")
    fails(["--resume", str(run_dir)], capsys, "do not fit")


def test_resume_from_a_pickled_object_file(run_dir, capsys):
    import argparse
    torch.save({"model": argparse.Namespace(a=1)}, run_dir / "checkpoint.pt")  # refused by weights_only
    line = fails(["--resume", str(run_dir)], capsys, "pickled Python object (argparse.Namespace)")
    assert "weights_only" not in line


def test_help_has_no_empty_defaults(capsys):
    text = build_parser().format_help()
    assert "(default: None)" not in text and "(default: runs/<timestamp>) (default" not in text
    assert "--overwrite" in text and "--min-count" in text


def test_junk_caption_does_not_grow_the_vocabulary(tmp_path):
    """One caption of 3000 distinct words: with the default --min-count they become [UNK]."""
    from minifilip.train import fit_tokenizer
    lines = ["filepath\ttitle"] + [f"img{i}.jpg\ta red circle left of a blue square" for i in range(20)]
    lines.append("junk.jpg\t" + " ".join(f"w{i}" for i in range(3000)))
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    args = build_parser().parse_args(["--train-data", str(tmp_path / "list.tsv")])
    tokenizer = fit_tokenizer(args)
    assert len(tokenizer) == 4 + len(set("a red circle left of a blue square".split()))
