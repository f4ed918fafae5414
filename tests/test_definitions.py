"""The definitions themselves, each against an independent oracle (a hand-computed value or a pure-Python loop).

Elsewhere the fast paths are compared with the readable reference; here the reference and the public API are
compared with the paper's formulas: the InfoNCE loss, which CMLI score is which, that the model's loss really uses
token selection, which text token the CLIP baseline reads, and that a checkpoint cannot run code when loaded.
Late-interaction functions are called with keyword arguments only, so their argument order is free to change.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from minifilip import FILIP, FILIPConfig
from minifilip.checkpoint import load_checkpoint
from minifilip.cmli import late_interaction, late_interaction_chunked, late_interaction_reference, select_tokens
from minifilip.loss import info_nce
from minifilip.tokenizer import BOS_ID, EOS_ID


def small_model(**overrides) -> FILIP:
    cfg = FILIPConfig.preset("tiny", image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
                             text_width=32, text_layers=2, text_heads=2, embed_dim=8, vocab_size=30,
                             context_length=10, **overrides)
    return FILIP(cfg).eval()


# --------------------------------------------------------------------------------------------- 1. the loss
def info_nce_by_hand(s_i2t: list[list[float]], s_t2i: list[list[float]], scale: float) -> float:
    """Paper's eq. (the symmetric InfoNCE), one softmax at a time: image i picks its text i along row i of s_i2t,
    text j picks its image j along *column* j of s_t2i (both matrices are indexed [image, text])."""
    b = len(s_i2t)
    i2t = sum(-math.log(math.exp(scale * s_i2t[i][i]) / sum(math.exp(scale * s_i2t[i][j]) for j in range(b)))
              for i in range(b)) / b
    t2i = sum(-math.log(math.exp(scale * s_t2i[j][j]) / sum(math.exp(scale * s_t2i[i][j]) for i in range(b)))
              for j in range(b)) / b
    return 0.5 * (i2t + t2i)


def test_info_nce_hand_computed_value():
    """2 pairs, 1/temperature 2, logits scale * s in {0, ln 3}: every softmax term is a fraction of small ints.

    image -> text rows of s_i2t: [ln3, 0] -> -log(3/4), [0, 0] -> -log(1/2): mean log(8/3) / 2
    text -> image columns of s_t2i: [ln3, 0] -> -log(3/4), [ln3, 0] (its image is the 0) -> -log(1/4): log(16/3) / 2
    loss = 1/2 (log(8/3) / 2 + log(16/3) / 2) = log(128/9) / 4
    """
    scale, a = 2.0, math.log(3) / 2.0
    s_i2t = torch.tensor([[a, 0.0], [0.0, 0.0]])
    s_t2i = torch.tensor([[a, a], [0.0, 0.0]])
    loss = info_nce(s_i2t, s_t2i, torch.tensor(scale))
    assert loss.item() == pytest.approx(math.log(128 / 9) / 4, rel=1e-6)
    assert info_nce_by_hand(s_i2t.tolist(), s_t2i.tolist(), scale) == pytest.approx(math.log(128 / 9) / 4)


@pytest.mark.parametrize("scale", [1 / 0.07, 3.0])
def test_info_nce_matches_the_loop_on_asymmetric_scores(scale):
    s_i2t, s_t2i = torch.rand(5, 5) * 2 - 1, torch.rand(5, 5) * 2 - 1  # unrelated, neither symmetric
    want = info_nce_by_hand(s_i2t.tolist(), s_t2i.tolist(), scale)
    got = info_nce(s_i2t, s_t2i, torch.tensor(scale)).item()
    assert got == pytest.approx(want, rel=1e-5)
    # the case can tell the right formula from the likely wrong ones (else this test could not fail)
    for wrong in (info_nce_by_hand(s_i2t.tolist(), s_t2i.t().tolist(), scale),  # t2i rows, not columns
                  info_nce_by_hand(s_i2t.tolist(), s_i2t.tolist(), scale),  # one matrix for both directions
                  info_nce_by_hand(s_i2t.tolist(), s_t2i.tolist(), 1.0)):  # temperature left out
        assert abs(wrong - want) > 1e-3 * abs(want)


# ----------------------------------------------------------------------------------- 2. which score is which
def cmli_by_loops(v, v_mask, w, w_mask):
    """s_i2t[i][j] = mean over valid patches k of max over valid tokens l of <v_ik, w_jl>; s_t2i the other way."""
    v, v_mask, w, w_mask = v.tolist(), v_mask.tolist(), w.tolist(), w_mask.tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    s_i2t = [[0.0] * len(w) for _ in v]
    s_t2i = [[0.0] * len(w) for _ in v]
    for i, (patches, pm) in enumerate(zip(v, v_mask)):
        patches = [p for p, ok in zip(patches, pm) if ok]
        for j, (tokens, tm) in enumerate(zip(w, w_mask)):
            tokens = [t for t, ok in zip(tokens, tm) if ok]
            s_i2t[i][j] = sum(max(dot(p, t) for t in tokens) for p in patches) / len(patches)
            s_t2i[i][j] = sum(max(dot(p, t) for p in patches) for t in tokens) / len(tokens)
    return torch.tensor(s_i2t), torch.tensor(s_t2i)


def hand_case():
    """2 images x 2 texts in 3-D, with padding that would change every score if it leaked in.

    image 0: e1, e2, e2                       text 0: e1, [pad e2]
    image 1: e2, (e1 + e2)/sqrt2, [pad e3]    text 1: e1, e3
    """
    e1, e2, e3 = torch.eye(3)
    r = 1 / math.sqrt(2)
    v = torch.stack([torch.stack([e1, e2, e2]), torch.stack([e2, r * (e1 + e2), e3])])  # (2, 3, 3)
    v_mask = torch.tensor([[True, True, True], [True, True, False]])
    w = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e3])])  # (2, 2, 3)
    w_mask = torch.tensor([[True, False], [True, True]])
    s_i2t = torch.tensor([[1 / 3, 1 / 3], [r / 2, r / 2]])  # e.g. [0, 0]: patches' best tokens 1, 0, 0 -> 1/3
    s_t2i = torch.tensor([[1.0, 1 / 2], [r, r / 2]])  # e.g. [1, 1]: tokens' best patches r, 0 -> r/2
    return v, v_mask, w, w_mask, s_i2t, s_t2i


def test_hand_case_by_loops():
    v, v_mask, w, w_mask, s_i2t, s_t2i = hand_case()
    got_i2t, got_t2i = cmli_by_loops(v, v_mask, w, w_mask)
    assert torch.allclose(got_i2t, s_i2t) and torch.allclose(got_t2i, s_t2i)
    assert not torch.allclose(s_i2t, s_t2i) and not torch.allclose(s_i2t, s_t2i.t())  # directions tell apart


CMLI_CALLS = {
    "reference": lambda **kw: late_interaction_reference(**kw),
    "chunked": lambda **kw: late_interaction_chunked(**kw, max_chunk_bytes=1),  # one pair per chunk
    "api-reference": lambda **kw: late_interaction(**kw, impl="reference"),
    "api-chunked": lambda **kw: late_interaction(**kw, impl="chunked"),
    "api-auto": lambda **kw: late_interaction(**kw),
}


@pytest.mark.parametrize("name", list(CMLI_CALLS))
def test_cmli_scores_are_the_paper_definitions(name):
    """Each public entry point, directly, on the hand case and on random padded tokens (pure-Python loop)."""
    v, v_mask, w, w_mask, s_i2t, s_t2i = hand_case()
    got_i2t, got_t2i = CMLI_CALLS[name](image_tokens=v, image_mask=v_mask, text_tokens=w, text_mask=w_mask)
    assert torch.allclose(got_i2t, s_i2t, atol=1e-6) and torch.allclose(got_t2i, s_t2i, atol=1e-6)
    v = F.normalize(torch.randn(3, 5, 4), dim=-1)
    w = F.normalize(torch.randn(4, 6, 4), dim=-1)
    v_mask, w_mask = torch.rand(3, 5) < 0.6, torch.rand(4, 6) < 0.6
    v_mask[:, 1], w_mask[:, 2] = True, True  # at least one valid token each
    want_i2t, want_t2i = cmli_by_loops(v, v_mask, w, w_mask)
    got_i2t, got_t2i = CMLI_CALLS[name](image_tokens=v, image_mask=v_mask, text_tokens=w, text_mask=w_mask)
    assert got_i2t.shape == (3, 4)
    assert torch.allclose(got_i2t, want_i2t, atol=1e-5) and torch.allclose(got_t2i, want_t2i, atol=1e-5)


@pytest.mark.parametrize("impl", [None, "reference", "chunked"])
def test_model_scores_keep_the_directions(impl):
    model = small_model()
    v, v_mask, w, w_mask, s_i2t, s_t2i = hand_case()
    got_i2t, got_t2i = model.scores(image_tokens=v, image_mask=v_mask, text_tokens=w, text_mask=w_mask, impl=impl)
    assert torch.allclose(got_i2t, s_i2t, atol=1e-6) and torch.allclose(got_t2i, s_t2i, atol=1e-6)
    got_i2t, got_t2i = model.pairwise_scores(v, v_mask, w, w_mask, block=1)  # image blocks, concatenated
    assert torch.allclose(got_i2t, s_i2t, atol=1e-6) and torch.allclose(got_t2i, s_t2i, atol=1e-6)


# ------------------------------------------------------------------------ 3. the loss uses token selection
def test_loss_with_token_selection_is_the_loss_on_the_selected_tokens():
    model = small_model(token_keep_ratio=0.5)
    full = small_model(token_keep_ratio=1.0)
    B, N, M, D = 4, 6, 7, 8
    img, txt = F.normalize(torch.randn(B, N, D), dim=-1), F.normalize(torch.randn(B, M, D), dim=-1)
    img_mask, txt_mask = torch.ones(B, N, dtype=torch.bool), torch.rand(B, M) < 0.7
    txt_mask[:, 0] = True
    kept = select_tokens(image_tokens=img, image_mask=img_mask, text_tokens=txt, text_mask=txt_mask, ratio=0.5)
    assert kept[1].sum(1).tolist() == [3] * B  # ceil(0.5 * 6) patches per image: selection did something
    s_i2t, s_t2i = cmli_by_loops(*kept)
    scale = model.inverse_temperature.item()
    want = info_nce_by_hand(s_i2t.tolist(), s_t2i.tolist(), scale)
    got = model.contrastive_loss(img, img_mask, txt, txt_mask).item()
    assert got == pytest.approx(want, rel=1e-5)
    everything = full.contrastive_loss(img, img_mask, txt, txt_mask).item()
    assert everything == pytest.approx(info_nce_by_hand(*[s.tolist() for s in cmli_by_loops(img, img_mask, txt,
                                                                                             txt_mask)], scale),
                                       rel=1e-5)
    assert abs(got - everything) > 1e-3  # keeping half the tokens changes the loss


# ------------------------------------------------------------------- 6. the CLIP text embedding is [EOS]'s
def test_global_text_embedding_is_the_eos_token():
    model = small_model(loss="clip")
    lengths = [1, 4, 8]  # 8 words + [BOS] + [EOS] fill the whole context of 10: no padding in that row
    ids = torch.zeros(3, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = BOS_ID, torch.randint(4, 30, (n,)), EOS_ID
    tokens, _ = model.encode_text(ids, granularity="tokens")  # (3, 10, D), every position
    glob, glob_mask = model.encode_text(ids)  # the CLIP loss's default: granularity "global"
    assert glob.shape == (3, 1, 8) and glob_mask.all()
    for b in range(3):
        eos = ids[b].tolist().index(EOS_ID)  # found by value, not by counting
        assert torch.allclose(glob[b, 0], tokens[b, eos], atol=1e-6)
        assert not torch.allclose(glob[b, 0], tokens[b, eos - 1], atol=1e-3)  # the last word is another vector


# -------------------------------------------------------------------- 5. loading a checkpoint runs no code
class RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do with something worse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _malicious_checkpoint(folder) -> tuple[str, str]:
    """(path of a checkpoint.pt with the three keys and a pickled callable inside, marker the callable creates)."""
    path, marker = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "code-ran")
    model = small_model()
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(),
                "tokenizer": {"type": "WordTokenizer", "itos": ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a"]},
                "args": {}, "payload": RunsCodeWhenUnpickled(marker)}, path)
    return path, marker


def test_checkpoint_with_pickled_code_is_refused_in_one_line(tmp_path):
    path, marker = _malicious_checkpoint(str(tmp_path))
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "pickled" in message and "mkdir" in message
    assert "weights_only=False" not in message  # torch's own advice would be the unsafe one
    assert not os.path.exists(marker)


def test_clis_refuse_a_checkpoint_with_pickled_code(tmp_path):
    """Resuming a run and evaluating a checkpoint: one line on stderr, exit 2, and the payload never ran."""
    (tmp_path / "run").mkdir()
    path, marker = _malicious_checkpoint(str(tmp_path / "run"))
    commands = [[os.path.join(ROOT, "train_small.py"), "--resume", str(tmp_path / "run")],
                ["-m", "minifilip.evaluate", "--checkpoint", path]]
    procs = [subprocess.Popen([sys.executable, *c], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "pickled" in lines[0], err
    assert not os.path.exists(marker)
