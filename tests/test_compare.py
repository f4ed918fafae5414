"""python -m minifilip.compare: trains the three objectives, writes table + figure, reuses and protects its runs."""
import json
import os
import subprocess
import sys

from conftest import ROOT
from minifilip import compare

TINY = ["--steps", "1", "--train-args", "--batch-size 4 --val-size 8 --warmup 1", "--n", "8", "--n-zeroshot", "2"]


def test_compare_end_to_end_then_reuse_and_refuse_other_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([*TINY, "--out", str(out)]) == 0
    assert {"clip", "filip", "clip-filip", "compare.json", "results.json", "table.md", "heatmaps.png"} <= \
        set(os.listdir(out))
    table = (out / "table.md").read_text()
    for row in ("| CLIP |", "| FILIP |", "| CLIP+FILIP |", "| untrained, CLIP scoring |", "| chance |",
                "| centre baseline |"):
        assert row in table
    assert "seg. mIoU colour" in table and "binding" in table and "s / step" in table
    rows = json.loads((out / "results.json").read_text())
    assert [r["loss"] for r in rows] == ["clip", "filip", "clip+filip"]
    # a finished run is reused as it is, never retrained
    args = compare.build_parser().parse_args([*TINY, "--out", str(out)])
    assert compare.ensure_trained("filip", str(out / "filip"), args) == "reused"
    capsys.readouterr()
    # run again: nothing retrained, so the evaluation is reused too (same table, no re-evaluation)
    assert compare.main([*TINY, "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "reusing the evaluation" in again and "evaluating" not in again
    assert (out / "table.md").read_text() == table
    # other settings in the same folder: one-line error, nothing touched
    before = (out / "filip" / "checkpoint.pt").stat().st_mtime_ns
    assert compare.main([*TINY, "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different comparison" in err[0] and "seed" in err[0]
    os.remove(out / "compare.json")  # even without the record, each checkpoint's own settings are checked
    assert compare.main([*TINY, "--seed", "1", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "filip" / "checkpoint.pt").stat().st_mtime_ns == before


def test_help():
    proc = subprocess.run([sys.executable, "-m", "minifilip.compare", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--steps" in proc.stdout and "--train-args" in proc.stdout
