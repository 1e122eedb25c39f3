"""The committed corpus: pinned content, disjoint seeded splits, prose and code, and a build that reproduces it."""

import gzip
import json
import sys

import pytest

from kvzap_lab import corpus, corpus_build

DEFAULT_SHA256 = "8928c75c2ed01fc383c28b255b064016646bb3241ad44f30e0d9665588dac8b5"


def test_default_corpus_is_pinned_and_described():
    c = corpus.load_corpus()
    assert c.sha256 == DEFAULT_SHA256  # a changed data file must be a deliberate change of this pin
    assert c.manifest() == {"name": "default", "source": c.source, "license": "PSF-2.0", "sha256": DEFAULT_SHA256}
    assert c.source.startswith("CPython 3.11.7 standard library")
    assert "Python Software Foundation License" in (corpus.DATA_DIR / "NOTICE").read_text()
    assert {d.kind for d in c.documents} == {"prose", "code"}
    assert corpus.available() == ["default"]
    with pytest.raises(ValueError, match="unknown corpus 'wiki'; available corpora: default"):
        corpus.load_corpus("wiki")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_are_disjoint_by_group_and_seeded(seed):
    c = corpus.load_corpus()
    splits = {name: c.split(name, seed) for name in corpus.SPLITS}
    groups = {name: {d.group for d in docs} for name, docs in splits.items()}
    assert not groups["filler"] & groups["train"] and not groups["filler"] & groups["test"]
    assert not groups["train"] & groups["test"]  # a module's docstrings and source share a split
    assert sum(map(len, splits.values())) == len(c.documents)
    assert {d.kind for d in splits["filler"]} == {"prose"} and splits["filler"] == c.split("filler", seed + 100)
    for name in ("train", "test"):
        assert {d.kind for d in splits[name]} == {"prose", "code"}
    assert 0.03 < len(groups["test"]) / len(groups["train"] | groups["test"]) < 0.2
    other = c.split("test", seed + 1)
    assert [d.name for d in other] != [d.name for d in splits["test"]]  # the seed moves documents
    assert all(d.kind == "code" for d in c.split("train", seed, kind="code"))
    with pytest.raises(ValueError, match="unknown corpus split 'dev'; splits: filler, train, test"):
        c.split("dev")


def test_build_reproduces_the_committed_file(tmp_path):
    """Under the interpreter that made the committed file (its header says which) the build gives the same
    content; under another one it is at least deterministic."""
    first = corpus_build.build(tmp_path / "a.jsonl.gz")
    header = json.loads(gzip.open(tmp_path / "a.jsonl.gz", "rt").readline())
    assert header["python"] == ".".join(map(str, sys.version_info[:3]))
    if header["python"] == "3.11.7":
        assert first == DEFAULT_SHA256
    else:
        assert corpus_build.build(tmp_path / "b.jsonl.gz") == first
