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


class ShowsWords(torch.nn.Module):
    """Stand-in model: an image filled with the value k embeds as one patch per word of pictures[k], the one-hot of
    that word; a text token embeds as the one-hot of its id (words only). Scores are then counts of shared words."""

    def __init__(self, tokenizer, pictures: list[list[str]]):
        super().__init__()
        self.config = SimpleNamespace(context_length=12, cmli_impl="reference")
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # zero_shot reads the device off the parameters
        self.vocab = len(tokenizer)
        n = max(len(p) for p in pictures)
        self.patch_ids = torch.tensor([[tokenizer.stoi[w] for w in p] + [0] * (n - len(p)) for p in pictures])

    def encode_image(self, images, granularity=None):
        ids = self.patch_ids[images[:, 0, 0, 0].round().long()]  # (B, N) the words each image "shows"
        return F.one_hot(ids, self.vocab).float(), ids > 0  # (B, N, V)

    def encode_text(self, ids, granularity=None):
        return F.one_hot(ids, self.vocab).float(), ids > 3  # (B, L, V); the 4 special tokens are not words


def pictures_of(shown: list[int]) -> torch.Tensor:
    """Images (n, 3, 8, 8) filled with the values in `shown`."""
    return torch.tensor(shown).float()[:, None, None, None].expand(-1, 3, 8, 8)


@pytest.mark.parametrize("ensemble", ["similarity", "embedding"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_zero_shot_accuracy_is_the_fraction_predicted_right(ensemble, direction):
    """Picture k is class k's name alone: every prompt of class k scores highest, whichever ensemble and direction."""
    tok = WordTokenizer(vocabulary())
    names = SHAPES[:4]  # 4 classes x 2 templates: a template-major reading would mix classes up
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    images = pictures_of([0, 1, 2, 3, 1, 1, 3, 0])  # the model is right on images 0, 1, 2, 3 and 5
    model = ShowsWords(tok, [[name] for name in names])
    out = zero_shot(model, tok, images, labels, names, BUILTIN_TEMPLATES[:2], ensemble, direction, batch_size=3,
                    warn=False)
    assert out["acc"] == pytest.approx(5 / 8) and out["n"] == 8 and out["chance"] == 1 / 4


@pytest.mark.parametrize("direction, right", [("i2t", False), ("t2i", True), ("mean", False)])
def test_zero_shot_direction_is_the_one_asked_for(direction, right):
    """Patches red, red, red, star; classes "red circle" and "star" (true), template "a {}.".
    i2t counts the patches a prompt explains: 3/4 vs 1/4, "red circle". t2i counts the prompt words the image
    explains: 1 of "a red circle ." = 1/4 vs 1 of "a star ." = 1/3, "star". mean: 1/2 vs 7/24, "red circle"."""
    tok = WordTokenizer(vocabulary())
    model = ShowsWords(tok, [["red", "red", "red", "star"]])
    out = zero_shot(model, tok, pictures_of([0]), torch.tensor([1]), ["red circle", "star"], ["a {}."], "similarity",
                    direction, warn=False)
    assert out["acc"] == float(right)


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
    table = capsys.readouterr().out  # | metric | chance | centre | this checkpoint | untrained |
    assert f"| retrieval image->text R@5 | - | - | {row['retrieval_i2t_R@5']:.3f} | " in table
    assert (f"| pointing game, all words | {row['pointing_chance']:.3f} | {row['pointing_centre']:.3f} | "
            f"{row['pointing_acc']:.3f} | {row['untrained_pointing_acc']:.3f} |") in table
