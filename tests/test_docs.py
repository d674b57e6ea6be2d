"""Docs match the code: every repo path they cite exists, every environment variable is documented.

Covers README.md, docs/*.md, the model cards and the ANE rules' sources (issue 16, item 15).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("s2dit_deploy", "model_zoo", "quant", "targets", "bench", "reference_training", "tests", "docs",
       "scripts", "shared", ".ci")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "model_zoo" / "checkpoints").glob("*/MODEL_CARD.md")),
        ROOT / "s2dit_deploy" / "analysis" / "ane_rules.py"]
# `dir/...` tokens starting at a top-level folder; training outputs (runs/...) and URLs are not repo paths
PATH = re.compile(r"(?<![\w/.:-])((?:%s)/[\w./*-]*[\w/*])" % "|".join(re.escape(t) for t in TOP))
ENV_READ = re.compile(r"""(?:environ\.get|environ\.setdefault|getenv|\benv\.get)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                      r"""|environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""")
SOURCES = ("*.py", "*.c", "*.sh")


def cited_paths(text: str) -> set[str]:
    return {m.rstrip("/.") for m in PATH.findall(text)}


def env_reads() -> dict[str, str]:
    """Every environment variable read anywhere in the repository -> the first file reading it."""
    found: dict[str, str] = {}
    for pattern in SOURCES:
        for f in sorted(ROOT.rglob(pattern)):
            rel = f.relative_to(ROOT).as_posix()
            if rel.startswith((".git/", "build/")) or "egg-info" in rel:
                continue
            for m in ENV_READ.finditer(f.read_text(errors="replace")):
                found.setdefault(m.group(1) or m.group(2), rel)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cited_repo_path_exists(doc):
    missing = sorted(p for p in cited_paths(doc.read_text()) if not any(ROOT.glob(p)))
    assert not missing, f"{doc.relative_to(ROOT)} cites paths not in the repo: {missing}"


def test_the_path_finder_sees_a_missing_citation():
    """The case found in issue 16: a rule citing shared/design/TOOLCHAINS.md, absent from the repo."""
    assert "shared/design/TOOLCHAINS.md" in cited_paths('SRC = "shared/design/TOOLCHAINS.md (facts)"')
    assert not cited_paths("see https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md")
    assert cited_paths("`bench/test_bench_*.py`") == {"bench/test_bench_*.py"}


def test_every_environment_variable_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    reads = env_reads()
    assert {"S2DIT_CACHE", "S2DIT_BENCH_MODEL", "S2DIT_COREML_EXECUTOR_THREADS"} <= set(reads)  # the scan works
    undocumented = sorted(f"{v} ({f})" for v, f in reads.items() if f"`{v}`" not in readme)
    assert not undocumented, "environment variables read but not in README's table: " + ", ".join(undocumented)
