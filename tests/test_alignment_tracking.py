"""--eval-every (held-out alignment over training) and the in-place temperature clamp."""
import json
import math

import pytest
import torch

from minifilip import FILIP, FILIPConfig
from minifilip.alignment import AlignmentTracker, retrieval_score, summary
from minifilip.checkpoint import load_model
from minifilip.data.builtin import builtin_val_pairs
from minifilip.data.grounded import vocabulary
from minifilip.loss import info_nce
from minifilip.pointing import pointing_game
from minifilip.tokenizer import WordTokenizer
from minifilip.train import main

FAST = ["--steps", "4", "--batch-size", "8", "--val-size", "16", "--log-every", "1", "--save-every", "2",
        "--warmup", "1", "--dropout", "0.1"]


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_every_logs_plots_keeps_best_and_leaves_training_alone(tmp_path):
    plain, tracked = tmp_path / "plain", tmp_path / "tracked"
    assert main([*FAST, "--out", str(plain)]) == 0
    assert main([*FAST, "--out", str(tracked), "--eval-every", "2", "--eval-size", "12"]) == 0
    losses = lambda rows: [r["loss"] for r in rows if "loss" in r]  # noqa: E731
    # evaluating between steps consumes no randomness and leaves the model in train mode: same losses, bit for bit
    assert losses(rows_of(plain / "metrics.jsonl")) == losses(rows_of(tracked / "metrics.jsonl"))
    evals = [r for r in rows_of(tracked / "metrics.jsonl") if "val_i2t_R@1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # step 0: the untrained network
    assert (tracked / "alignment.png").stat().st_size > 1000 and not (plain / "alignment.png").exists()

    # the logged numbers are the metrics of the saved model on the first --eval-size val scenes
    model, tok, ckpt = load_model(tracked / "checkpoint.pt")
    images, captions, scenes = builtin_val_pairs(12, 64)
    want = pointing_game(model, tok, scenes)
    assert evals[-1]["val_pointing_acc"] == pytest.approx(want["pointing_acc"], abs=1e-6)
    assert evals[-1]["val_pointing_acc_color"] == pytest.approx(want["pointing_acc_color"], abs=1e-6)
    assert evals[-1]["temperature"] == pytest.approx(1 / model.inverse_temperature.item())

    # best.pt: the step with the best mean R@1 (ties: the earliest), loadable without optimizer state
    best_row = max(evals, key=retrieval_score)
    best, _, best_ckpt = load_model(tracked / "best.pt")
    assert best_ckpt["step"] == best_row["step"] and "optimizer" not in best_ckpt
    final = json.loads((tracked / "final.json").read_text())
    assert final["alignment"]["untrained"]["step"] == 0 and final["alignment"]["last"]["step"] == 4
    assert final["alignment"]["best"]["step"] == best_row["step"]


def test_eval_every_resumes_without_duplicate_rows(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out), "--eval-every", "2", "--eval-size", "12", "--stop-at", "3"]) == 0
    assert main(["--resume", str(out)]) == 0
    steps = [r["step"] for r in rows_of(out / "metrics.jsonl") if "val_i2t_R@1" in r]
    assert steps == [0, 2, 4]


def test_tracker_hands_the_model_back_in_its_mode():
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary())
    model = FILIP(FILIPConfig.preset("tiny", vocab_size=len(tok), dropout=0.1)).train()
    images, captions, scenes = builtin_val_pairs(6, 64)
    row = AlignmentTracker(tok, images, captions, scenes).measure(model)
    assert model.training and {"val_pointing_acc", "val_i2t_R@1", "val_t2i_R@1", "temperature"} <= set(row)
    assert summary([]) == {} and summary([{**row, "step": 3}])["best"]["step"] == 3


def test_eval_every_must_not_be_negative(capsys):
    assert main(["--eval-every", "-1"]) == 2
    assert "--eval-every" in capsys.readouterr().err


def test_temperature_past_its_floor_comes_back_down():
    """A scale driven past 1/min_temperature must still get a gradient, so that it can decrease when the loss asks
    (a clamp inside the forward pass gives exactly zero gradient there and traps it)."""
    model = FILIP(FILIPConfig.preset("tiny", vocab_size=10))
    cap = math.log(1 / model.config.min_temperature)
    with torch.no_grad():
        model.logit_scale.fill_(cap + 0.5)
    wrong = torch.eye(4).flip(0)  # every positive scores below a negative: a lower scale lowers the loss
    info_nce(wrong, wrong, model.inverse_temperature).backward()
    assert model.logit_scale.grad.item() > 0  # so gradient descent lowers it
    opt = torch.optim.SGD([model.logit_scale], lr=0.1)
    opt.step()
    model.clamp_logit_scale_()
    assert model.logit_scale.item() < cap  # below the cap: the clamp did not hold it up, the step brought it down
    with torch.no_grad():
        model.logit_scale.fill_(cap + 3.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(cap)


def test_training_keeps_the_temperature_at_or_above_its_floor(tmp_path):
    """A huge learning rate drives the scale up at once; the loop clamps it in place after every step."""
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out), "--lr", "50", "--steps", "2"]) in (0, 2)  # may end in a NaN loss
    rows = [r for r in rows_of(out / "metrics.jsonl") if "temperature" in r]
    assert rows and all(r["temperature"] >= 0.01 - 1e-9 for r in rows)
