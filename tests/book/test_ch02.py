"""Chapter 2 as a learner runs it: a word tokenizer on The Verdict, then GPT-2 BPE windows."""

from __future__ import annotations

import pytest
import torch

from gptlab.book import (GPTDatasetV1, SimpleTokenizerV1, SimpleTokenizerV2, build_vocab, create_dataloader_v1,
                         gpt2_tokenizer, split_words)
from gptlab.errors import GptlabError


def test_vocabulary_figures(verdict):
    # The course: 4,690 pieces, 1,130 distinct; 1,132 with <|endoftext|> and <|unk|>.
    assert len(split_words(verdict)) == 4690
    assert len(build_vocab(verdict)) == 1130
    vocab = build_vocab(verdict, ["<|endoftext|>", "<|unk|>"])
    assert len(vocab) == 1132 and vocab["<|endoftext|>"] == 1130 and vocab["<|unk|>"] == 1131


def test_simple_tokenizer_v1_round_trip(verdict):
    tok = SimpleTokenizerV1(build_vocab(verdict))
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tok.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    assert tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    with pytest.raises(GptlabError, match="'Hello' is not in the vocabulary.*SimpleTokenizerV2"):
        tok.encode("Hello, do you like tea?")
    with pytest.raises(GptlabError, match="token id 99999"):
        tok.decode([99999])


def test_simple_tokenizer_v2_unknown_words(verdict):
    tok = SimpleTokenizerV2(build_vocab(verdict, ["<|endoftext|>", "<|unk|>"]))
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    ids = tok.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    with pytest.raises(GptlabError, match="needs <\\|unk\\|>"):
        SimpleTokenizerV2(build_vocab(verdict))


def test_gpt2_tokenizer_from_local_files_matches_tiktoken(tokenizer, verdict, data_dir):
    local = gpt2_tokenizer(data_dir / "gpt2")
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = local.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
                   34680, 27271, 13]
    assert local.encode(verdict) == tokenizer.encode(verdict) and len(local.encode(verdict)) == 5145
    with pytest.raises(GptlabError, match="lacks vocab.bpe, encoder.json"):
        gpt2_tokenizer(data_dir)


def test_sliding_window_dataloader(tokenizer, verdict):
    loader = create_dataloader_v1(verdict, batch_size=1, max_length=4, stride=1, shuffle=False, tokenizer=tokenizer)
    it = iter(loader)
    x, y = next(it)
    assert x.tolist() == [[40, 367, 2885, 1464]] and y.tolist() == [[367, 2885, 1464, 1807]]
    x2, y2 = next(it)
    assert x2.tolist() == [[367, 2885, 1464, 1807]] and y2.tolist() == [[2885, 1464, 1807, 3619]]

    loader = create_dataloader_v1(verdict, batch_size=8, max_length=4, stride=4, shuffle=False, tokenizer=tokenizer)
    x, y = next(iter(loader))
    ids = tokenizer.encode(verdict)
    assert x.shape == (8, 4)
    assert x.tolist() == [ids[i:i + 4] for i in range(0, 32, 4)]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert x[0].tolist() == [40, 367, 2885, 1464] and x[-1].tolist() == [284, 3285, 326, 11]


def test_dataset_window_count_and_errors(tokenizer):
    ds = GPTDatasetV1("one two three four five six seven", tokenizer, max_length=3, stride=2)
    n = len(tokenizer.encode("one two three four five six seven"))
    assert len(ds) == len(range(0, n - 3, 2))
    with pytest.raises(GptlabError, match="too few for one window"):
        GPTDatasetV1("short", tokenizer, max_length=8, stride=8)
    with pytest.raises(GptlabError, match="stride=0"):
        GPTDatasetV1("short text", tokenizer, max_length=2, stride=0)


def test_course_signature_uses_tiktoken_and_offline_failure_is_explained(tokenizer, verdict, monkeypatch):
    # `tokenizer` set TIKTOKEN_CACHE_DIR, so the course's call (no tokenizer argument) works offline.
    loader = create_dataloader_v1(verdict, batch_size=2, max_length=8, stride=8, shuffle=False)
    x, _ = next(iter(loader))
    assert x.tolist() == [tokenizer.encode(verdict)[i:i + 8] for i in (0, 8)]
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GptlabError, match="could not load the GPT-2 tokenizer.*encoder.json and vocab.bpe"):
        create_dataloader_v1(verdict)


def test_gptlab_tokenizers_work_with_the_lecture_functions(tokenizer, verdict, data_dir):
    from gptlab.book import text_to_token_ids, token_ids_to_text
    from gptlab.tokenizers import load_tokenizer

    tok = load_tokenizer(str(data_dir / "gpt2"))
    ids = text_to_token_ids("Every effort moves you<|endoftext|>", tok)
    assert ids.tolist() == [[6109, 3626, 6100, 345, 50256]]
    assert token_ids_to_text(ids, tok) == "Every effort moves you<|endoftext|>"
    ds = GPTDatasetV1(verdict[:500], tok, max_length=4, stride=4)
    ref = GPTDatasetV1(verdict[:500], tokenizer, max_length=4, stride=4)
    assert len(ds) == len(ref) and all(torch.equal(ds[i][0], ref[i][0]) for i in range(len(ds)))
