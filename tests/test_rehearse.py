"""benchmarks/rehearse_cc3m.py: the whole rehearsal (scenes as shards, synthetic step rate, the recipe with FILIP and
CLIP losses, loader sweep) in its tiny CPU mode, into one JSON file."""
import json

import pytest
import torch

from benchmarks import rehearse_cc3m  # the checkout is on sys.path (pytest.ini); benchmarks/ is a namespace package


def test_help():
    with pytest.raises(SystemExit) as e:
        rehearse_cc3m.main(["--help"])
    assert e.value.code == 0


def test_tiny_rehearsal_writes_every_figure(tmp_path, capsys):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = rehearse_cc3m.main(["--tiny", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(saved)
    r = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, {k: v for k, v in r.items() if isinstance(v, dict) and "error" in v}
    assert r["mode"] == "tiny" and r["write_train"]["n"] == 48 and r["write_val"]["split"] == "val"
    for loss in ("filip", "clip"):
        run = r[f"run_{loss}"]
        assert r[f"synthetic_{loss}"]["img_s"] > 0 and run["e2e_img_s"] > 0 and 0 <= run["data_wait_frac"] <= 1
        assert 0 <= run["final_alignment"]["val_pointing_acc"] <= 1 and run["final_val"]["n"] == 8
        assert f"--loss {loss}" in run["command"] and "--micro-batch-size 8" in run["command"]
    for sweep in ("sweep_256px", "sweep_128px"):
        assert r[sweep]["loader"][0]["img_s"] > 0 and r[sweep]["per_image_ms"]["decode+train"] > 0
    assert "| filip |" in capsys.readouterr().out
