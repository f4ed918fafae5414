import torch

from minifilip.metrics import retrieval_metrics


def test_perfect_and_reversed_rankings():
    caps = [f"caption {i}" for i in range(5)]
    eye = torch.eye(5)
    m = retrieval_metrics(eye, eye, caps)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0 and abs(m["chance_R@1"] - 0.2) < 1e-6
    m = retrieval_metrics(-eye, -eye, caps)  # the right answer always ranks last
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@5"] == 1.0


def test_identical_captions_count_as_hits_and_ties_are_pessimistic():
    caps = ["a red circle.", "A red circle.", "a blue square."]
    s = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(s, s, caps)
    # image 0 ranks caption 1 first: identical text, so a hit; image 1's best right answer ties 0.0 vs 0.5 wrong
    assert abs(m["i2t_R@1"] - 2 / 3) < 1e-6
    tie = torch.zeros(3, 3)
    assert retrieval_metrics(tie, tie, caps)["i2t_R@1"] == 0.0
    assert abs(retrieval_metrics(tie, tie, caps)["chance_R@1"] - (2 + 2 + 1) / 9) < 1e-6
