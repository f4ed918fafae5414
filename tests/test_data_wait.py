"""The training loop logs how long each step waited for its batch: data_wait_frac (share of the logging interval's
wall time) next to img/s, in metrics.jsonl and on the progress bar; timing only, no randomness consumed."""
import json

import torch

from minifilip.train import main


def test_metrics_rows_carry_the_data_wait_fraction(tmp_path, capsys):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--steps", "4", "--batch-size", "4", "--val-size", "4", "--warmup", "1", "--log-every", "2",
                "--set", "image_size=32", "--out"]
        assert main([*argv, str(tmp_path / "a")]) == 0
        assert main([*argv, str(tmp_path / "b")]) == 0
    finally:
        torch.set_num_threads(saved)
    rows = {k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in "ab"}
    assert [r["step"] for r in rows["a"]] == [2, 4]
    for r in rows["a"]:
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["img_per_s"] > 0
    assert [r["loss"] for r in rows["a"]] == [r["loss"] for r in rows["b"]]  # the timing changes nothing
