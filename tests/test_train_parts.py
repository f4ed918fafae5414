"""The training loop's parts, in process: schedule, optimizer groups, precision, one batch shape for every
source, the shared retrieval evaluation, the val-scene picker."""
import math

import pytest
import torch

from minifilip import FILIP, FILIPConfig, WordTokenizer
from minifilip.data.builtin import BuiltinTrainStream, builtin_val_pairs, find_val_scenes
from minifilip.data.grounded import render_scene, vocabulary
from minifilip.evaluate import retrieval
from minifilip.metrics import retrieval_metrics
from minifilip.pointing import INSIDE_RULE, inside_rule
from minifilip.train import TrainData, autocast_for, lr_at, make_optimizer


def tiny(dropout=0.0):
    tok = WordTokenizer(vocabulary())
    cfg = FILIPConfig.preset("tiny", vocab_size=len(tok), vision_layers=1, text_layers=1, vision_width=32,
                             text_width=32, embed_dim=16, dropout=dropout)
    torch.manual_seed(0)
    return FILIP(cfg), tok


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    lr = lambda step: lr_at(step, lr=2.0, warmup_steps=4, total_steps=10)
    assert [lr(s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr(4) == 2.0 and lr(7) == pytest.approx(1.0) and lr(10) == pytest.approx(0.0) and lr(12) == lr(10)
    assert lr(5) == pytest.approx(1.0 + math.cos(math.pi / 6))
    assert lr_at(0, lr=1.0, warmup_steps=0, total_steps=5) == 1.0  # no warm-up: the cosine from the peak
    with pytest.raises(TypeError):
        lr_at(0, 1.0, 4, 10)  # numbers by name only: no argparse.Namespace, no order to remember


def test_optimizer_decays_matrices_only():
    model, _ = tiny()
    opt = make_optimizer(model, lr=0.5, weight_decay=0.3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0 and opt.defaults["lr"] == 0.5
    ids = lambda group: {id(p) for p in group["params"]}
    assert id(model.logit_scale) in ids(no_decay) and id(model.visual.proj.weight) in ids(decay)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(ids(decay) | ids(no_decay)) == len(list(model.parameters()))


def test_grad_scaler_is_always_there_and_a_pass_through_without_fp16():
    autocast, scaler, precision = autocast_for(torch.device("cpu"), "auto")
    assert precision == "fp32" and not scaler.is_enabled()
    loss = torch.tensor(2.5, requires_grad=True)
    assert scaler.scale(loss) is loss
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        autocast_for(torch.device("cpu"), "fp16")


def test_builtin_stream_and_real_batches_reach_the_loop_in_one_shape():
    stream = BuiltinTrainStream(3, seed=2, start_step=4)
    data = TrainData(iter(stream), 3, epoch_len=None, counts={})
    images, captions = data.next_batch(4)
    want_images, want_captions, _keys, _counts = BuiltinTrainStream(3, seed=2).batch(4)
    assert torch.equal(images, want_images) and captions == want_captions
    assert data.counts == {} and data.log_fields(5) == {} and data.postfix(5) == {}
    # a real-data loader's batches: counts are summed over the run and reported per epoch
    real = iter([(images, captions, ["k0", "k1", "k2"], {"decode_error": 2, "mode_CMYK": 1}),
                 (images, captions, ["k3", "k4", "k5"], {"decode_error": 1})])
    data = TrainData(real, 3, epoch_len=12, counts={"no_image": 4})
    data.next_batch(0), data.next_batch(1)
    assert data.counts == {"no_image": 4, "decode_error": 3, "mode_CMYK": 1}
    assert data.log_fields(2) == {"epoch": 0.5, "bad_samples": {"no_image": 4, "decode_error": 3},
                                  "converted_samples": {"mode_CMYK": 1}}
    assert data.postfix(2) == {"epoch": "0.50", "bad": 7, "conv": 1}
    with pytest.raises(ValueError, match="ran out at step 2"):
        data.next_batch(2)


def test_retrieval_evaluates_in_eval_mode_and_restores_the_mode():
    model, tok = tiny(dropout=0.5)
    images, captions, _ = builtin_val_pairs(8, 64)
    model.train()
    got = retrieval(model, tok, images, captions, batch_size=3, ks=(1, 5))
    assert model.training  # the training loop carries on in train mode
    model.eval()
    s_i2t, s_t2i = model.pairwise_scores(*model.encode_image(images), *model.encode_text(tok.encode(captions, 24)))
    assert got == retrieval_metrics(s_i2t, s_t2i, captions, ks=(1, 5))  # dropout off: deterministic scores


def test_find_val_scenes_takes_the_first_that_qualify():
    found = find_val_scenes(lambda sc: len(sc.objects) >= 2, 3, image_size=32)
    indices = [i for i, _ in found]
    assert indices == sorted(indices) and all(len(sc.objects) >= 2 for _, sc in found)
    skipped = set(range(indices[-1])) - set(indices)
    assert all(len(render_scene(0, "val", i, 32).objects) < 2 for i in skipped)
    with pytest.raises(ValueError, match="only 0 of the first 5"):
        find_val_scenes(lambda sc: False, 1, 32, search=5)


def test_inside_rule_names_the_overlap_it_is_used_with():
    assert INSIDE_RULE == inside_rule(0.0) and "at least one pixel" in INSIDE_RULE
    assert "more than 50% of its pixels" in inside_rule(0.5)
