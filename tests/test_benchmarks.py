"""Smoke tests of the benchmark scripts at tiny sizes on the CPU: they run, write the JSON they promise, and their
correctness checks pass. No timing is asserted (speed belongs to the GPU runs, benchmarks/gpu_issue17.sh)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_cmli_impls import run_in_interpreter

ROOT = Path(__file__).resolve().parents[1]

BENCH_CMLI_SCRIPT = textwrap.dedent("""
    import json, runpy
    bench_cmli = runpy.run_path("benchmarks/bench_cmli.py", run_name="bench_cmli")  # the script's globals
    out = {OUT!r}
    bench_cmli["main"](["--device", "cpu", "--check", "--check-large", "5", "--N", "9", "--M", "5", "--D", "16",
                     "--batches", "4", "--impls", "triton", "--ranking", "--set", "fwd.ARGMAX=2",
                     "--set", "ranking.BLOCK_D=16", "--budget-ms", "1", "--json", out])
    r = json.load(open(out))
    assert r["settings"] == {"fwd.ARGMAX": 2, "ranking.BLOCK_D": 16}, r["settings"]
    worst = r["check"]["worst"]
    assert set(worst) == {"fp32/chunked", "fp32/triton", "bf16/chunked"}, worst  # bf16 triton: GPU only
    assert any("needs a GPU" in n for n in r["check"]["notes"])
    assert all(v <= 1e-6 for v in worst["fp32/triton"].values()), worst
    errs = r["check_large"]["rel_err_vs_chunked"]
    assert all(v is True or v <= 1e-6 for v in errs.values()), errs
    row = r["rows"][0]
    assert row["batch"] == 4 and set(row["ranking_ms"]) == {"chunked", "triton"} and "ms" in row["triton"]
""")


def test_bench_cmli_check_smoke(tmp_path):
    """--check (fp32 kernels under the interpreter, bf16 Triton reported as needing a GPU), --check-large,
    --ranking and --set at tiny sizes."""
    run_in_interpreter(BENCH_CMLI_SCRIPT.replace("{OUT!r}", repr(str(tmp_path / "cmli.json"))),
                       kernel="benchmarks/bench_cmli.py --check")


def test_bench_train_loss_rows_smoke(tmp_path):
    """Part (e): CLIP, FILIP and FILIP + selection rows with the loss alone and the ranking alone, tiny preset."""
    out = tmp_path / "train.json"
    cmd = [sys.executable, "benchmarks/bench_train.py", "--device", "cpu", "--only-loss-rows", "--loss-batches", "4",
           "--steps", "1", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = [x for x in r["rows"] if x["part"] == "e"]
    assert [(x["loss"], x["keep"]) for x in rows] == [("clip", 1.0), ("filip", 1.0), ("filip", 0.25)]
    assert all(x["status"] == "ok" and x["step_ms"] > 0 and x["loss_ms"] > 0 for x in rows)
    assert "ranking_ms" not in rows[0] and all(x["ranking_ms"] > 0 for x in rows[1:])
    assert set(r["summary"]["loss_rows"]["eager"]["ratios_4"]) >= {"filip_over_clip", "selection_over_clip"}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)  # never overwrites silently
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_gpu_script_parses():
    """bash -n on the one-command GPU run (its DRY_RUN=1 path runs everything at tiny sizes; too slow for here)."""
    if subprocess.run(["bash", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_issue17.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_probe_shapes_smoke(tmp_path):
    """The supervised shape/colour probe (issue 12) trains, scores its val set and writes its JSON once."""
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "benchmarks/probe_shapes.py", "--task", "color", "--steps", "3", "--batch-size", "4",
           "--n-val", "6", "--eval-every", "2", "--object-scale", "1.5", "--quiet", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert [row["step"] for row in r["rows"]] == [2, 3] and r["chance"] == pytest.approx(1 / 6)
    assert all(0.0 <= row["val_acc"] <= 1.0 for row in r["rows"]) and r["object_scale"] == 1.5
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
