"""Checkpoints: weights_only round trip and atomic writes that survive a kill."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from minifilip import FILIP, FILIPConfig, WordTokenizer
from minifilip.checkpoint import load_checkpoint, load_model, save_checkpoint

from conftest import ROOT


def tiny_model():
    tok = WordTokenizer.fit(["a red circle.", "a blue square."])
    cfg = FILIPConfig.preset("tiny", vision_layers=1, text_layers=1, vocab_size=len(tok), image_size=32)
    return FILIP(cfg).eval(), tok


def test_save_load_gives_identical_outputs(tmp_path):
    model, tok = tiny_model()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, tok, step=7)
    raw = torch.load(path, weights_only=True)  # plain tensors and Python values only
    assert raw["step"] == 7 and raw["config"]["image_size"] == 32
    loaded, tok2, _ = load_model(path)
    images, ids = torch.randn(2, 3, 32, 32), tok.encode(["a red circle.", "a blue square."], 24)
    assert tok2.itos == tok.itos
    assert torch.equal(model.similarity(images, ids), loaded.similarity(images, ids))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tok = tiny_model()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, tok, step=1)

    def dies_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # as if the run were killed while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tok, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_sigkill_during_saving_never_corrupts(tmp_path):
    """A child process saves a few-MB checkpoint in a loop; we SIGKILL it at random moments."""
    script = textwrap.dedent(f"""
        import torch
        from minifilip.checkpoint import atomic_torch_save
        big = torch.randn(2_000_000)
        i = 0
        while True:
            i += 1
            atomic_torch_save({{"step": i, "w": big + i}}, {str(tmp_path / 'checkpoint.pt')!r})
            print(i, flush=True)
    """)
    for delay in (0.8, 1.1, 1.35):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)  # -c: cwd on sys.path
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert torch.equal(ckpt["w"][:3], (ckpt["w"][:3] - ckpt["step"]) + ckpt["step"])


def test_loading_garbage_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable minifilip checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_saved_checkpoints_get_ordinary_file_permissions(tmp_path):
    """mkstemp makes 0600 files; a checkpoint must be as readable as the run's other files (umask applies)."""
    model, tok = tiny_model()
    save_checkpoint(tmp_path / "checkpoint.pt", model, tok)
    (tmp_path / "other.json").write_text("{}")
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "checkpoint.pt") == mode(tmp_path / "other.json")


def test_foreign_pickles_are_refused_without_torchs_unsafe_advice(tmp_path):
    import argparse
    torch.save({"model": argparse.Namespace(x=1), "config": {}, "tokenizer": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert "pickled Python object (argparse.Namespace)" in str(e.value) and "weights_only" not in str(e.value)
    assert "\n" not in str(e.value)


def test_weights_must_fit_the_config_before_any_allocation(tmp_path, monkeypatch):
    """A 2 KB file whose config asks for a huge model is refused from the shapes; nothing real is built."""
    model, tok = tiny_model()
    save_checkpoint(tmp_path / "ok.pt", model, tok)
    raw = torch.load(tmp_path / "ok.pt", weights_only=True)
    raw["config"].update(vision_width=2 ** 20, vision_heads=1, vision_layers=12)  # ~ 150 G parameters
    raw["model"] = {"logit_scale": torch.zeros(())}
    torch.save(raw, tmp_path / "huge.pt")
    assert os.path.getsize(tmp_path / "huge.pt") < 10_000
    real_init = FILIP.__init__

    def init_on_meta_only(self, config):  # building the huge config anywhere but on the meta device is the bug
        assert torch.empty(0).device.type == "meta", "model built with real memory before the shape check"
        real_init(self, config)

    monkeypatch.setattr(FILIP, "__init__", init_on_meta_only)
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "huge.pt")
    monkeypatch.undo()
    raw = torch.load(tmp_path / "ok.pt", weights_only=True)
    raw["model"]["visual.pos"] = raw["model"]["visual.pos"][:, :5]
    torch.save(raw, tmp_path / "misfit.pt")
    with pytest.raises(ValueError, match="visual.pos"):
        load_model(tmp_path / "misfit.pt")
