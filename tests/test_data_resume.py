"""Exact mid-epoch resume on real data: a run stopped and resumed sees every sample of the epoch exactly once and,
with the same seed, the same losses step for step; older checkpoints still resume (epoch restart, with a note)."""
import json
import os
from collections import Counter

import pytest
import torch

from minifilip import train as train_mod
from minifilip.data.make_subset import make_subset
from minifilip.data.sources import make_loader, train_stream
from minifilip.train import main

from test_data_shards import clean_shards


def keys_and_positions(stream, batches, workers=2, batch=3):
    keys, positions, last = [], {}, None
    loader = make_loader(stream, batch, workers)
    for _b, (_x, _c, k, _counts, (slot, _n, epoch, consumed)) in zip(range(batches), loader):
        keys += k
        positions[slot], last = (epoch, consumed), slot
    return keys, positions, last


@pytest.mark.parametrize("buffer", [0, 4])
def test_stream_resumes_each_worker_after_its_last_delivered_sample(tmp_path, buffer):
    spec = clean_shards(tmp_path, n_shards=4, per_shard=6)  # 2 workers x 2 shards x 6 = 4 batches of 3 each
    stream = lambda: train_stream(spec, 16, seed=1, shuffle_buffer=buffer, autoaugment=False, epochs=1)  # noqa: E731
    full = train_stream(spec, 16, seed=1, shuffle_buffer=buffer, autoaugment=False, epochs=1)
    full.track_positions = True
    whole, _, _ = keys_and_positions(full, 100)
    assert len(whole) == 24 and len(set(whole)) == 24
    first = stream()
    first.track_positions = True
    before, positions, last = keys_and_positions(first, 3)  # worker 0 gave 2 batches, worker 1 gave 1
    rest = stream()
    rest.track_positions, rest.resume_positions, rest.worker_rotation = True, positions, (last + 1) % 2
    after, _, _ = keys_and_positions(rest, 100)
    assert Counter(before + after) == Counter(whole)
    assert before + after == whole  # and in the same order: the rotation hands the next slot's batch over first


def test_same_sample_same_augmentation_whatever_came_before(tmp_path):
    """Per-sample seeds: a sample's crop and caption depend on (seed, epoch, slot, index), not on the history."""
    spec = clean_shards(tmp_path, n_shards=1, per_shard=6)
    a = list(train_stream(spec, 16, seed=3, shuffle_buffer=0, epochs=1))
    torch.manual_seed(123)  # the process generator is not what the augmentation draws from
    b = train_stream(spec, 16, seed=3, shuffle_buffer=0, epochs=1)
    b.resume_positions = {0: (0, 2)}
    rest = list(b)
    assert [k for _x, _c, k, _d in rest] == [k for _x, _c, k, _d in a[2:]]
    assert all(torch.equal(x, y) for (x, *_), (y, *_) in zip(rest, a[2:]))
    state = torch.get_rng_state()
    list(train_stream(spec, 16, seed=3, shuffle_buffer=0, epochs=1))
    assert torch.equal(state, torch.get_rng_state())  # in-process loading leaves the training generator alone


COMMON = ["--batch-size", "4", "--val-size", "4", "--warmup", "1", "--log-every", "1", "--save-every", "100",
          "--num-workers", "2", "--shuffle-buffer", "0", "--min-count", "1", "--set", "image_size=32",
          "--steps", "9"]


ORIGINAL_NEXT_BATCH = train_mod.TrainData.next_batch


def run_recording_keys(argv, monkeypatch):
    seen = []
    original = ORIGINAL_NEXT_BATCH

    def recording(self, step):
        out = original(self, step)
        seen.append(list(self.last_keys))
        return out
    monkeypatch.setattr(train_mod.TrainData, "next_batch", recording)
    assert main(argv) == 0
    return seen


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def test_stopped_and_resumed_run_sees_each_sample_once_with_the_same_losses(tmp_path, monkeypatch, capsys,
                                                                            one_thread):
    data = str(tmp_path / "scenes")
    make_subset("builtin", data, n=24, size=32, samples_per_shard=6, progress=False)  # 4 shards: 6 steps an epoch
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    whole = run_recording_keys([*COMMON, "--train-data", data, "--out", a], monkeypatch)
    part = run_recording_keys([*COMMON, "--train-data", data, "--out", b, "--stop-at", "4"], monkeypatch)
    ckpt = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    assert ckpt["data_position"]["slots"] == 2 and len(ckpt["data_position"]["positions"]) == 2
    part += run_recording_keys(["--resume", b], monkeypatch)
    assert "resuming the data exactly" in capsys.readouterr().out
    epoch = lambda batches: Counter(k for batch in batches[:6] for k in batch)  # noqa: E731
    assert epoch(part) == epoch(whole) and len(epoch(whole)) == 24 and set(epoch(whole).values()) == {1}
    assert part == whole  # batch by batch, into the second epoch
    assert losses(b) == pytest.approx(losses(a), rel=1e-5, abs=1e-6)


def test_checkpoint_without_position_resumes_from_the_epoch_start(tmp_path, capsys, one_thread):
    data = clean_shards(tmp_path / "d", n_shards=2, per_shard=6)
    out = str(tmp_path / "run")
    argv = ["--batch-size", "4", "--val-size", "4", "--warmup", "1", "--num-workers", "0", "--min-count", "1",
            "--steps", "4", "--train-data", data, "--out", out]
    assert main([*argv, "--stop-at", "2"]) == 0
    path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["data_position"]  # as written before the position existed
    torch.save(ckpt, path)
    assert main(["--resume", out]) == 0
    assert "restarting epoch 0 from its beginning" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["step"] == 4


def test_resume_at_any_sample_of_dirty_shards_counts_every_bad_sample_once(tmp_path):
    """Cut-off tars, broken JPEGs, converted images: stopped after any sample and resumed, the keys and the bad /
    converted counts add up to the uninterrupted stream's, nothing twice, nothing lost."""
    from test_data_shards import MAX_PIXELS, SIZE, build_dirty
    spec = build_dirty(tmp_path)

    def stream(resume=None):
        s = train_stream(spec, SIZE, seed=0, shuffle_buffer=3, epochs=1, max_pixels=MAX_PIXELS, autoaugment=False)
        s.track_positions, s.resume_positions = True, resume or {}
        return [(k, d, p) for _x, _c, k, d, p in s]

    whole = stream()
    total = sum((Counter(d) for _k, d, _p in whole), Counter())
    for cut in range(1, len(whole)):
        _slot, _n, epoch, index = whole[cut - 1][2]
        rest = stream({0: (epoch, index)})
        assert [k for k, _d, _p in whole[:cut] + rest] == [k for k, _d, _p in whole]
        assert sum((Counter(d) for _k, d, _p in whole[:cut] + rest), Counter()) == total, cut


def test_other_worker_count_resumes_from_the_epoch_start(tmp_path, capsys, one_thread):
    data = clean_shards(tmp_path / "d", n_shards=2, per_shard=6)
    out = str(tmp_path / "run")
    assert main(["--batch-size", "4", "--val-size", "4", "--warmup", "1", "--num-workers", "0", "--min-count", "1",
                 "--steps", "3", "--stop-at", "1", "--train-data", data, "--out", out]) == 0
    assert main(["--resume", out, "--num-workers", "2"]) == 0
    assert "its loader position is for 1 slots, not 2" in capsys.readouterr().out
