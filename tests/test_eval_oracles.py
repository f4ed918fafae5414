"""Zero-shot accuracy and the evaluation report checked for their values, not just their range or keys.

Zero-shot runs on a stand-in model whose prediction for every image is chosen in advance, so the accuracy is known
exactly. The report (python -m minifilip.evaluate) is checked number by number against the metric functions it
claims to report, called directly on the same data; those functions have their own oracles (test_evaluate.py's
known ranks, test_pointing_oracle.py, the stand-in below).
"""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minifilip import WordTokenizer
from minifilip.checkpoint import load_model, save_checkpoint
from minifilip.data.builtin import builtin_val_pairs
from minifilip.data.grounded import SHAPES, vocabulary
from minifilip.evaluate import main, retrieval
from minifilip.pointing import pointing_game
from minifilip.zeroshot import BUILTIN_TEMPLATES, builtin_zeroshot_data, zero_shot
from test_visualize import tiny_model


class ShowsOneClass(torch.nn.Module):
    """Stand-in model: an image filled with the value k embeds as one patch, the one-hot of class k's word; a text
    token embeds as the one-hot of its id (words only). Every prompt of class k then scores 1 against it (i2t) and
    every other prompt 0, whichever way the templates are ensembled: the model predicts k."""

    def __init__(self, tokenizer, class_names):
        super().__init__()
        self.config = SimpleNamespace(context_length=12)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # zero_shot reads the device off the parameters
        self.word_of_class = torch.tensor([tokenizer.stoi[c] for c in class_names])
        self.vocab = len(tokenizer)

    def encode_image(self, images, granularity=None):
        shown = images[:, 0, 0, 0].round().long()  # (B,) the class each image "shows"
        tokens = F.one_hot(self.word_of_class[shown], self.vocab).float()[:, None]  # (B, 1, V)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def encode_text(self, ids, granularity=None):
        return F.one_hot(ids, self.vocab).float(), ids > 3  # (B, L, V); the 4 special tokens are not words


@pytest.mark.parametrize("ensemble", ["similarity", "embedding"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_zero_shot_accuracy_is_the_fraction_predicted_right(ensemble, direction):
    tok = WordTokenizer(vocabulary())
    names = SHAPES[:4]  # 4 classes x 2 templates: a template-major reading would mix classes up
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    shown = torch.tensor([0, 1, 2, 3, 1, 1, 3, 0])  # right on images 0, 1, 2, 3 and 5
    images = shown.float()[:, None, None, None].expand(-1, 3, 8, 8)
    out = zero_shot(ShowsOneClass(tok, names), tok, images, labels, names, BUILTIN_TEMPLATES[:2], ensemble,
                    direction, batch_size=3, warn=False)
    assert out["acc"] == pytest.approx(5 / 8) and out["n"] == 8 and out["chance"] == 1 / 4


def test_report_values_are_the_metrics_it_names(tmp_path, capsys):
    model, tok = tiny_model()
    save_checkpoint(tmp_path / "checkpoint.pt", model, tok, step=3)
    assert main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--n", "12", "--n-zeroshot", "6",
                 "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())
    model, tok, _ = load_model(tmp_path / "checkpoint.pt")
    images, captions, scenes = builtin_val_pairs(12, 64)
    want = {f"retrieval_{k}": v for k, v in retrieval(model, tok, images, captions).items()}
    for task in ("shape", "color"):
        zs_images, labels, names = builtin_zeroshot_data(task, 6, 64)
        for ensemble in ("similarity", "embedding"):
            z = zero_shot(model, tok, zs_images, labels, names, BUILTIN_TEMPLATES, ensemble, "i2t", warn=False)
            want[f"zeroshot_{task}_{ensemble}"], want[f"zeroshot_{task}_chance"] = z["acc"], z["chance"]
            want[f"zeroshot_{task}_n"] = z["n"]
    want.update(pointing_game(model, tok, scenes))
    want.update(step=3, loss="filip", token_keep_ratio=1.0)
    for key, value in want.items():
        assert row[key] == pytest.approx(value, abs=1e-5), key  # the JSON rounds to 5 decimals
    table = capsys.readouterr().out
    assert f"| {row['retrieval_i2t_R@1']:.3f} / {row['retrieval_i2t_R@5']:.3f} / {row['retrieval_i2t_R@10']:.3f} |" \
        in table
    assert f"| {row['pointing_acc']:.3f} ({row['pointing_chance']:.3f}) |" in table
