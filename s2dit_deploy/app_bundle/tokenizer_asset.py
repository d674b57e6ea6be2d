"""The prompt tokenizer as data: ``host/tokenizer.json`` in the Hugging Face ``tokenizers`` format.

Apps tokenize with that library's Swift / Kotlin / C++ ports instead of porting CLIP's BPE. The
file is the very ``tokenizers.Tokenizer`` our ``model_zoo.tokenizer`` runs (vocabulary, merges,
CLIP normalizer and pre-tokenizer, bos/eos post-processor), with truncation and padding set to the
text encoder's length, so ``Tokenizer.encode(clean(prompt)).ids`` is the ``input_ids`` row. What
the library cannot do (OpenAI's ftfy + double HTML-unescape + whitespace collapse before BPE) is
stated in host_loop.json's ``tokenizer.clean``.

The written file is re-read with ``tokenizers`` and must reproduce the project's ids for a set of
prompts (non-ASCII included), else the compile fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CompileCheckError
from ..model_zoo import tokenizer as clip

# prompts the written tokenizer must reproduce ids for: ASCII, accents, CJK, emoji, HTML entities,
# apostrophe contractions, digits, and one longer than the context (truncation keeps eos last)
CHECK_PROMPTS = (
    "a red fox jumps over the lazy dog",
    "Café, déjà vu — naïve Ångström ½",
    "日本の桜が咲く 🌸🎉",
    "don't stop &amp; it's 2026!!",
    "  A   PANDA\teating\nbamboo  ",
    " ".join(["streaming"] * 100),
)
CLEAN_STEPS = ("ftfy.fix_text", "html.unescape", "html.unescape", "collapse whitespace runs to one space and strip")


def clean(text: str) -> str:
    """What an app applies before ``encode`` (``model_zoo.tokenizer.clean_text``)."""
    return clip.clean_text(text)


def write_tokenizer(path: Path, length: int) -> dict[str, Any]:
    """Write ``tokenizer.json`` for ``length`` ids and check it; return its host_loop.json entry."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(clip.load_clip_tokenizer().backend_tokenizer.to_str())  # a copy: the cached one stays as is
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=clip.PAD_ID, pad_token=clip.EOS_TOKEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    check_tokenizer(path, length)
    return {
        "format": "huggingface-tokenizers",
        "length": length,
        "bos_id": clip.BOS_ID, "eos_id": clip.EOS_ID, "pad_id": clip.PAD_ID,
        "clean": list(CLEAN_STEPS),
        "encode": "Tokenizer.from_file(file).encode(clean(prompt)).ids: bos + BPE ids + eos, truncated "
                  f"keeping eos last, padded with pad_id to {length}; fed as int32 (1, {length})",
        "checks": [{"prompt": p, "ids": clip.tokenize(p, length)[0].tolist()} for p in CHECK_PROMPTS[:3]],
    }


def check_tokenizer(path: Path, length: int) -> None:
    """``CompileCheckError`` unless the file gives the project's ids for every check prompt."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    for prompt in CHECK_PROMPTS:
        want = clip.tokenize(prompt, length)[0].tolist()
        got = tok.encode(clean(prompt)).ids
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise CompileCheckError(f"{path} does not reproduce the project's token ids for {prompt!r}: "
                                    f"first difference at position {first} (got {got[first:first + 4]}, "
                                    f"want {want[first:first + 4]}, {len(got)} vs {len(want)} ids)")
