"""Offline text corpora of natural prose and code, with reproducible document splits.

    from kvzap_lab.corpus import load_corpus
    corpus = load_corpus()                 # the committed default corpus
    corpus.sha256, corpus.source           # for a dataset manifest
    corpus.split("filler")                 # task contexts (kvzap_lab.tasks)
    corpus.split("train", seed=0)          # oracle datasets; "test" holds the other documents

A corpus is a committed gzip file of JSON lines under ``kvzap_lab/corpus_data/`` (``NAME.jsonl.gz``): a header,
then one document per line. The default one is built from CPython's standard library by
``python -m kvzap_lab.corpus_build`` (language-reference prose, docstrings, module sources; PSF licence): no
network and no model hub at run time, and the same bytes on every machine.

Splits: ``filler`` is the language-reference prose (fixed, whatever the seed); ``train`` and ``test`` share out the
other documents (docstrings and code) by a seeded hash of their group (a module's docstrings and its source
are one group), ``TEST_FRACTION`` of the groups in ``test``. The three splits are disjoint for every seed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "corpus_data"
SPLITS = ("filler", "train", "test")
KINDS = ("prose", "code")
TEST_FRACTION = 0.1
FILLER_GROUP_PREFIX = "reference/"


@dataclass(frozen=True)
class Document:
    """One document: ``name`` (``reference/if``, ``docstrings/json.decoder``, ``code/heapq``), ``group`` (documents
    of one group always share a split), ``kind`` (``"prose"`` or ``"code"``) and its ``text``."""

    name: str
    group: str
    kind: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: its documents and what a manifest records about it.

    ``sha256`` is the digest of the uncompressed content (header and documents), ``source`` a one-line
    provenance, ``license`` an SPDX identifier, ``path`` the committed file.
    """

    name: str
    source: str
    license: str
    sha256: str
    path: Path
    documents: tuple[Document, ...]

    def split(self, split: str, seed: int = 0, kind: str | None = None) -> list[Document]:
        """The documents of ``split`` (``"filler"``, ``"train"`` or ``"test"``), in corpus order.

        Args:
            split: which split; ``filler`` does not depend on ``seed``.
            seed: the train/test assignment (a seeded hash of each document's group).
            kind: keep only ``"prose"`` or ``"code"`` documents (default: both).
        Raises:
            ValueError: an unknown split or kind.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown corpus split {split!r}; splits: {', '.join(SPLITS)}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown document kind {kind!r}; kinds: {', '.join(KINDS)}")
        return [d for d in self.documents if _split_of(d.group, seed) == split and kind in (None, d.kind)]

    def manifest(self) -> dict:
        """What a dataset manifest records: name, source, licence and sha256."""
        return {"name": self.name, "source": self.source, "license": self.license, "sha256": self.sha256}


def _split_of(group: str, seed: int) -> str:
    if group.startswith(FILLER_GROUP_PREFIX):
        return "filler"
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if draw < TEST_FRACTION else "train"


def available() -> list[str]:
    """Names of the corpora shipped with the lab."""
    return sorted(p.name.removesuffix(".jsonl.gz") for p in DATA_DIR.glob("*.jsonl.gz"))


@functools.lru_cache(maxsize=4)
def load_corpus(name: str = "default") -> Corpus:
    """Load the committed corpus ``name`` (cached).

    Raises:
        ValueError: no corpus of that name (the message lists the available ones).
    """
    path = DATA_DIR / f"{name}.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"unknown corpus {name!r}; available corpora: {', '.join(available()) or 'none'}")
    content = gzip.decompress(path.read_bytes())
    header, *lines = content.decode().splitlines()
    meta = json.loads(header)
    documents = tuple(Document(**json.loads(line)) for line in lines)
    return Corpus(name, meta["source"], meta["license"], hashlib.sha256(content).hexdigest(), path, documents)
