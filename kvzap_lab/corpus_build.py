"""Build the committed default corpus (``kvzap_lab/corpus_data/default.jsonl.gz``) from CPython's own text.

    python -m kvzap_lab.corpus_build [--out kvzap_lab/corpus_data/default.jsonl.gz]

Sources, all from the standard library of the running interpreter (PSF licence, see ``corpus_data/NOTICE``):

- ``reference/<topic>`` (prose): the language-reference topics of ``pydoc_data.topics`` (what ``help("if")``
  prints), one document per topic;
- ``docstrings/<module>`` (prose): the module, class and function docstrings of a standard-library module, in
  source order, read with :mod:`ast` (nothing is imported);
- ``code/<module>`` (code): the source of a standard-library module, for ~``CODE_BUDGET`` characters of modules
  drawn in a fixed pseudo-random order (sha256 of the path).

The output is a gzip file (mtime 0) of JSON lines: a header ``{"corpus", "source", "python", "license"}`` then
one ``{"name", "group", "kind", "text"}`` per document. Its content (the uncompressed bytes) depends only on the
interpreter's version: the header records it, and :func:`kvzap_lab.corpus.load_corpus` exposes the content's
sha256 for dataset manifests.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from kvzap_lab import io

DEFAULT_OUT = Path(__file__).resolve().parent / "corpus_data" / "default.jsonl.gz"
# Parts of the standard library left out: tests, vendored or generated code, demos, codecs tables.
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__", "encodings", "ensurepip",
              "turtledemo", "pydoc_data", "__phello__"}
MIN_DOCSTRING_CHARS = 1500  # a module whose docstrings are shorter gives no prose document
CODE_BUDGET = 1_500_000  # characters of source code
MAX_CODE_FILE = 120_000  # larger modules are left out of the code documents (one module would dominate)
SOURCE = "CPython {version} standard library: pydoc_data.topics, module docstrings and module sources"


def stdlib_modules(root: Path) -> list[tuple[str, Path]]:
    """``(module name, path)`` of the standard-library source files kept, sorted by name."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return sorted(out)


def docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of ``source``, in source order (empty if it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def build_documents(root: Path) -> list[dict]:
    """Every document of the corpus, in a fixed order."""
    from pydoc_data import topics

    documents = [
        {"name": f"reference/{name}", "group": f"reference/{name}", "kind": "prose", "text": text.strip() + "\n"}
        for name, text in sorted(topics.topics.items())
    ]
    modules = stdlib_modules(root)
    sources = {name: path.read_text(encoding="utf-8") for name, path in modules}
    for name, source in sources.items():
        docs = docstrings(source)
        if sum(map(len, docs)) >= MIN_DOCSTRING_CHARS:
            documents.append({"name": f"docstrings/{name}", "group": f"module/{name}", "kind": "prose", "text": "\n\n".join(docs) + "\n"})
    order = sorted(sources, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    budget = CODE_BUDGET
    for name in order:
        source = sources[name]
        if len(source) > MAX_CODE_FILE or len(source) > budget or not source.strip():
            continue
        documents.append({"name": f"code/{name}", "group": f"module/{name}", "kind": "code", "text": source})
        budget -= len(source)
    return documents


def build(out: Path) -> str:
    """Write the corpus to ``out`` (atomically) and return the sha256 of its uncompressed content."""
    version = ".".join(map(str, sys.version_info[:3]))
    header = {"corpus": "default", "source": SOURCE.format(version=version), "python": version, "license": "PSF-2.0"}
    lines = [json.dumps(header, sort_keys=True)] + [json.dumps(d, sort_keys=True) for d in build_documents(Path(sysconfig.get_paths()["stdlib"]))]
    content = ("\n".join(lines) + "\n").encode()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
            f.write(content)

    io.atomic_write(out, write)
    return hashlib.sha256(content).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.corpus_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="gzip JSON lines to write")
    args = parser.parse_args(argv)
    print(f"{args.out}: sha256 {build(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
