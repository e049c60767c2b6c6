"""The offline corpus the demo's base update is trained on: documentation text shipped with Python itself
(docstrings of standard-library modules and their public classes and functions).

It is far from both the base's chat data and the study's tasks, so continual training on it moves the
base the way a version update does (new knowledge, weights all changed) without any download. The text
depends only on the Python version; ``fingerprint`` records which text was used.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect

from .data import Dataset, from_texts

MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "difflib", "email.message", "fractions",
           "functools", "heapq", "http.client", "itertools", "json", "logging", "pathlib", "pickle", "random",
           "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
           "unittest", "urllib.parse", "uuid", "zipfile", "zlib")


def _docs(module_name: str):
    """Docstrings of a module and of its public classes/functions, in name order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a stripped-down Python may lack one (e.g. sqlite3); the corpus just gets shorter
        return
    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                yield f"{name}: {doc}"


def stdlib_docs(max_passages: int, passage_chars: int = 600) -> Dataset:
    """Up to ``max_passages`` passages of about ``passage_chars`` characters, cut at paragraph breaks,
    taken round-robin over MODULES so a short corpus still spans many topics."""
    per_module = []
    for name in MODULES:
        passages, current = [], ""
        for doc in _docs(name):
            for para in doc.split("\n\n"):
                para = para.strip()
                if not para:
                    continue
                if current and len(current) + len(para) > passage_chars:
                    passages.append(current)
                    current = ""
                current = f"{current}\n\n{para}" if current else para[: passage_chars * 2]
        if current:
            passages.append(current)
        per_module.append(passages)
    out: list[str] = []
    depth = 0
    while len(out) < max_passages and any(depth < len(p) for p in per_module):
        out.extend(p[depth] for p in per_module if depth < len(p))
        depth += 1
    return from_texts(out[:max_passages], "Python standard-library docstrings")


def fingerprint(dataset: Dataset) -> str:
    """sha256 (first 16 hex digits) of the corpus text, to tell which text a run used."""
    h = hashlib.sha256()
    for ex in dataset.examples:
        h.update((ex.text or "").encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
