"""CLIP tokenizer: real OpenAI ids, an independent reference BPE, round trips, padding, asset errors."""

from __future__ import annotations

import gzip
import importlib.util
import sys

import pytest
import regex
import torch

from s2dit_deploy.model_zoo import tokenizer as T

# OpenAI CLIP's pre-tokenizer pattern (applied to lowercased, whitespace-cleaned text).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _byte_table() -> dict[int, str]:
    """GPT-2/CLIP byte->unicode table, written out again so the test does not trust the module.
    Its insertion order (printable bytes first) is OpenAI's base-token id order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


def make_reference_bpe():
    """Tiny reference BPE over the real vocab file: id(base char) = its index, id(char</w>) = 256 +
    index, id(merged token) = 512 + rank of the merge that produced it (OpenAI's vocab order)."""
    lines = gzip.open(T.find_vocab_file()).read().decode("utf-8").split("\n")[1 : 48894 + 1]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines)}
    byte_char = _byte_table()
    char_id = {c: i for i, c in enumerate(byte_char.values())}

    def bpe_word(word: str) -> list[int]:
        syms = [byte_char[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        ids = [char_id[s] if s in char_id else 256 + char_id[s[:-4]] for s in syms]
        while len(syms) > 1:
            pair = min(zip(syms, syms[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            new_syms, new_ids, i = [], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
                    new_syms.append(syms[i] + syms[i + 1])
                    new_ids.append(512 + ranks[pair])
                    i += 2
                else:
                    new_syms.append(syms[i])
                    new_ids.append(ids[i])
                    i += 1
            syms, ids = new_syms, new_ids
        return ids

    def encode(text: str) -> list[int]:
        return [i for w in CLIP_PATTERN.findall(" ".join(text.lower().split())) for i in bpe_word(w)]

    return encode


@pytest.fixture(scope="module")
def reference_bpe():
    return make_reference_bpe()


def _inner(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    assert ids[0] == T.BOS_ID
    return ids[1 : ids.index(T.EOS_ID)]


def test_known_openai_ids():
    ids = T.tokenize("a photo of a cat")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == T.PAD_ID).all()


def test_reference_bpe_reproduces_known_ids(reference_bpe):
    assert reference_bpe("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_vocab_size_and_special_ids():
    tok = T.load_clip_tokenizer()
    assert len(tok) == T.VOCAB_SIZE == 49408
    assert tok.convert_tokens_to_ids([T.BOS_TOKEN, T.EOS_TOKEN]) == [49406, 49407]
    assert T.load_clip_tokenizer() is tok  # cached


@pytest.mark.parametrize(
    "text", ["s2dit", "hexagon's", "quokka", "naïve café", "transformerization 🐱", "sandwich-diffusion"]
)
def test_matches_reference_bpe(reference_bpe, text):
    expected = reference_bpe(text)
    assert _inner(T.tokenize(text)[0]) == expected


def test_matches_openai_simple_tokenizer_file():
    """Cross-check with open_clip's copy of OpenAI's SimpleTokenizer, loaded by file path so the
    open_clip package (and torchvision) is never imported."""
    path = T.find_vocab_file().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer()
    prompts = [
        "A corgi surfing a wave at sunset, cinematic, 4k",
        "  Timelapse of   clouds over Mount Fuji &amp; a lake  ",
        "it's 12:30 — the robot's ARM doesn't move!!",
        "Ünïcödé straße 😀😀 in Zürich",
    ]
    ours = T.tokenize(prompts)
    for row, p in zip(ours, prompts):
        assert _inner(row) == ref.encode(p), p
    assert "open_clip" not in sys.modules and "torchvision" not in sys.modules


@pytest.mark.parametrize(
    "prompt",
    ["A Photo of a CAT", "  two   dogs\tplaying\nin snow ", "a cat's hat, on the mat!", "naïve café 🐱 42"],
)
def test_decode_round_trip(prompt):
    # CLIP decoding lowercases, collapses whitespace and puts a space after every pre-token.
    normalized = " ".join(CLIP_PATTERN.findall(" ".join(prompt.lower().split())))
    assert T.decode(T.tokenize(prompt)[0]) == normalized
    assert T.ClipTokenizer().decode(T.tokenize(prompt)[0].tolist()) == normalized


def test_batch_padding_and_truncation():
    long_prompt = " ".join(["word"] * 100)
    ids = T.tokenize(["a cat", long_prompt])
    assert ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [T.BOS_ID, 320, 2368, T.EOS_ID] and (ids[0, 4:] == T.PAD_ID).all()
    assert ids[1, 0] == T.BOS_ID and ids[1, -1] == T.EOS_ID
    assert (ids[1, 1:-1] == ids[1, 1]).all() and ids[1, 1] != T.EOS_ID
    short = T.ClipTokenizer(max_length=8)(long_prompt)
    assert short.shape == (1, 8) and short[0, 0] == T.BOS_ID and short[0, -1] == T.EOS_ID
    with pytest.raises(ValueError):
        T.tokenize("x", max_length=1)


def test_missing_asset_raises_clear_error(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None)
        with pytest.raises(T.TokenizerAssetError, match="pip install --no-deps open-clip-torch==3.3.0"):
            T.find_vocab_file()

    class EmptySpec:
        submodule_search_locations = [str(tmp_path)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: EmptySpec())
        with pytest.raises(T.TokenizerAssetError, match="bpe_simple_vocab_16e6"):
            T.find_vocab_file()

    def missing():
        raise T.TokenizerAssetError("missing")

    T.load_clip_tokenizer.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "find_vocab_file", missing)
            with pytest.raises(T.TokenizerAssetError):
                T.tokenize("a cat")
    finally:
        T.load_clip_tokenizer.cache_clear()
