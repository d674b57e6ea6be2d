"""OpenAI CLIP BPE tokenizer, built offline from the vocabulary file shipped in open-clip-torch.

Why this shape:

* The CLIP text encoder's checkpoints expect the exact OpenAI token ids, so the vocabulary must be
  the real one. It ships as ``bpe_simple_vocab_16e6.txt.gz`` inside ``open-clip-torch``; we only
  read that data file and never import ``open_clip`` (its ``__init__`` pulls torchvision).
* The BPE itself is done by ``transformers.CLIPTokenizer`` (Rust ``tokenizers`` backend). We only
  rebuild the vocabulary/merges exactly as OpenAI's ``simple_tokenizer.py`` does, so nothing is
  downloaded from the hub.
* Before BPE, prompts get OpenAI's ``basic_clean`` + ``whitespace_clean`` (ftfy, HTML unescape,
  whitespace collapse), which the transformers normalizer omits; lowercasing is done by the
  tokenizer's normalizer as in CLIP.

Padding: positions after ``<|endoftext|>`` are filled with ``PAD_ID = 49407`` (``<|endoftext|>``,
the convention of the ``openai/clip-vit-large-patch14`` tokenizer used by Stable-Diffusion-style
conditioning), not open_clip's 0. The text stage conditions on ``last_hidden_state`` over all 77
positions, and with CLIP's causal mask the padded positions' states do depend on the pad id, so it
must match what the checkpoint was trained with. The pooled output is not used; if it were,
``CLIPTextModel`` takes the *first* eos position, which remains the real end of the prompt.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
from pathlib import Path

import ftfy
import torch

logger = logging.getLogger(__name__)

VOCAB_ASSET = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = EOS_ID
# OpenAI keeps merges [1 : 49152 - 256 - 2 + 1] of the file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2
_INSTALL_HINT = (
    "install it with `pip install --no-deps open-clip-torch==3.3.0` "
    "(--no-deps because open-clip-torch would pull torchvision; only its vocabulary file is used)"
)


class TokenizerAssetError(RuntimeError):
    """The CLIP BPE vocabulary file (from open-clip-torch) is not installed."""


def find_vocab_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` in the installed open-clip-torch, without importing it.

    ``importlib.util.find_spec`` on a top-level package only locates it; ``open_clip/__init__.py``
    (which imports torchvision) is not executed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerAssetError(f"the CLIP vocabulary needs the open-clip-torch package: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / VOCAB_ASSET
        if path.is_file():
            return path
    raise TokenizerAssetError(
        f"{VOCAB_ASSET} not found in open_clip at {list(spec.submodule_search_locations)}; {_INSTALL_HINT}"
    )


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (insertion order defines base token ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab_and_merges(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as OpenAI's ``SimpleTokenizer.__init__`` builds them."""
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerAssetError(f"{path}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def load_clip_tokenizer():
    """The real ``transformers.CLIPTokenizer`` over the OpenAI vocabulary (cached; built offline)."""
    from transformers import CLIPTokenizer

    path = find_vocab_file()
    vocab, merges = build_vocab_and_merges(path)
    logger.debug("building CLIP tokenizer from %s", path)
    tok = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH, pad_token=EOS_TOKEN
    )
    if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (BOS_ID, EOS_ID, PAD_ID):
        raise TokenizerAssetError(f"{path}: special token ids differ from OpenAI CLIP's")
    return tok


def clean_text(text: str) -> str:
    """OpenAI's ``basic_clean`` + ``whitespace_clean`` (ftfy, double HTML unescape, collapse spaces)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def tokenize(prompts: str | list[str], max_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """``(B, max_length)`` ids: bos + BPE tokens + eos, truncated keeping eos last, padded with PAD_ID."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for bos and eos")
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = load_clip_tokenizer()
    if not prompts:
        return torch.empty((0, max_length), dtype=torch.long)
    texts = [clean_text(p) for p in prompts]
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
    out = torch.full((len(prompts), max_length), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(ids):
        seq = [BOS_ID, *seq, EOS_ID]
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def decode(ids) -> str:
    """Text of one id sequence with bos/eos/padding removed (CLIP-normalized: lowercase, single spaces)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = [int(i) for i in ids if int(i) not in (BOS_ID, EOS_ID)]
    return load_clip_tokenizer().decode(ids, skip_special_tokens=True).strip()


class ClipTokenizer:
    """Small callable facade: ``ClipTokenizer()(prompts)`` -> ``(B, max_length)`` LongTensor."""

    bos_id, eos_id, pad_id, vocab_size = BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    def __init__(self, max_length: int = CONTEXT_LENGTH) -> None:
        self.max_length = max_length

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        return tokenize(prompts, self.max_length)

    def decode(self, ids) -> str:
        return decode(ids)

    @property
    def hf_tokenizer(self):
        return load_clip_tokenizer()
