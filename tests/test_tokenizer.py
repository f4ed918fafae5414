import pytest
import torch

from minifilip.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, WordTokenizer


def test_balloon_is_the_papers_eight_tokens():
    tok = WordTokenizer.fit(["a photo of a balloon.", "a photo of a dog."])
    tokens = tok.tokens("a photo of a balloon.", 77)
    assert tokens == ["[BOS]", "a", "photo", "of", "a", "balloon", ".", "[EOS]"]
    assert tokens.index("balloon") == 5
    ids = tok.encode("A photo of a BALLOON.", 10)[0]
    assert ids.tolist()[:8] == [BOS_ID] + [tok.stoi[w] for w in tokens[1:-1]] + [EOS_ID]
    assert ids[8:].tolist() == [PAD_ID, PAD_ID]


def test_round_trip_and_unknown_words():
    tok = WordTokenizer.fit(["a red circle left of a blue square.", "two dogs, one cat!"])
    for text in ["a red circle left of a blue square.", "two dogs, one cat!"]:
        assert tok.decode(tok.encode(text, 20)[0]) == text
    ids = tok.encode("a purple circle", 8)[0]
    assert ids[2] == UNK_ID and tok.decode(ids) == "a [UNK] circle"


def test_truncation_keeps_eos():
    tok = WordTokenizer.fit(["one two three four five six seven"])
    ids = tok.encode(["one two three four five six seven", "one"], 5)
    assert ids.shape == (2, 5)
    assert ids[0].tolist() == [BOS_ID, tok.stoi["one"], tok.stoi["two"], tok.stoi["three"], EOS_ID]
    assert ids[1].tolist() == [BOS_ID, tok.stoi["one"], EOS_ID, PAD_ID, PAD_ID]


def test_fit_limits_and_persistence(tmp_path):
    tok = WordTokenizer.fit(["a a a b b c"], max_size=6, min_count=1)
    assert tok.itos[4:] == ["a", "b"]  # most frequent first, cut at max_size
    assert WordTokenizer.fit(["a a a b b c"], min_count=2).itos[4:] == ["a", "b"]
    tok.save(tmp_path / "vocab.json")
    again = WordTokenizer.load(tmp_path / "vocab.json")
    assert again.itos == tok.itos
    assert torch.equal(again.encode("a b c", 6), tok.encode("a b c", 6))
    with pytest.raises(ValueError):
        WordTokenizer.from_dict({"itos": ["x", "y"]})


def test_fit_on_an_instance_is_loud():
    """tok = WordTokenizer(); tok.fit(captions) used to return a new tokenizer and leave tok empty, silently."""
    with pytest.raises(TypeError, match=r"tok = WordTokenizer.fit"):
        WordTokenizer().fit(["a red circle."])
    assert len(WordTokenizer.fit(["a red circle."])) == 4 + 4  # on the class it still works
