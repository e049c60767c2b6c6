"""JSONL datasets for training and evaluation, validated before any model work starts.

Two kinds, one per file:
- ``{"text": ...}``: language-model loss over the whole text;
- ``{"prompt": ..., "completion": ...}``: loss on the completion only, and exact-match accuracy by greedy
  decoding of the prompt.
Every problem is reported as one ``UserError`` line naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TEXT = "text"
PROMPT_COMPLETION = "prompt/completion"


@dataclass(frozen=True)
class Example:
    """One record: ``text`` set for the text kind; ``prompt`` and ``completion`` for the other."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class Dataset:
    kind: str  # TEXT or PROMPT_COMPLETION
    examples: tuple[Example, ...]
    source: str = "<memory>"

    @property
    def has_completions(self) -> bool:
        return self.kind == PROMPT_COMPLETION

    def __len__(self) -> int:
        return len(self.examples)


def _record_kind(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise UserError(f"{where}: a prompt/completion record needs string fields 'prompt' and 'completion'"
                                f" ('{key}' is {'missing' if key not in obj else type(obj[key]).__name__})")
        for key in ("prompt", "completion"):  # an empty prompt leaves greedy decoding nothing to start from
            if not obj[key].strip():
                raise UserError(f"{where}: '{key}' is empty")
        return PROMPT_COMPLETION
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        return TEXT
    raise UserError(f"{where}: a record needs a 'text' field or 'prompt' and 'completion' fields; "
                    f"found {sorted(obj)}")


def load_jsonl(path: str | Path, argument: str = "--data") -> Dataset:
    """Read and validate a JSONL file: every line one record, all of the same kind, at least one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{argument}: {path} does not exist")
    if not path.is_file():
        raise UserError(f"{argument}: {path} is not a file")
    try:
        # Lines end at "\n" only (JSONL), not at every break splitlines() or universal newlines know: JSON
        # strings may hold U+2028 or U+0085, and a lone "\r" is whitespace between JSON tokens.
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{argument}: cannot read {path}: {e}") from None
    kind, examples = None, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{argument}: {path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{where}: JSON nested too deeply to read") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise UserError(f"{where}: cannot read this JSON ({str(e).split(':')[0]})") from None
        this = _record_kind(obj, where)
        for key in (("text",) if this == TEXT else ("prompt", "completion")):
            try:  # JSON escapes can spell lone surrogates, which no tokenizer takes
                obj[key].encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"{where}: '{key}' holds the unpaired surrogate {e.object[e.start]!r}, "
                                f"which is not text") from None
        if kind is None:
            kind = this
        elif this != kind:
            raise UserError(f"{where}: a {this} record in a {kind} file (use one kind per file)")
        examples.append(Example(text=obj["text"]) if this == TEXT
                        else Example(prompt=obj["prompt"], completion=obj["completion"]))
    if not examples:
        raise UserError(f"{argument}: {path} has no records")
    return Dataset(kind=kind, examples=tuple(examples), source=str(path))


def write_jsonl(path: str | Path, dataset: Dataset) -> None:
    """Write a dataset in the format ``load_jsonl`` reads."""
    from ..atomic_io import atomic_write_text

    lines = []
    for ex in dataset.examples:
        obj = {"text": ex.text} if dataset.kind == TEXT else {"prompt": ex.prompt, "completion": ex.completion}
        lines.append(json.dumps(obj) + "\n")
    atomic_write_text(path, "".join(lines))


def from_pairs(pairs, source: str = "<generated>") -> Dataset:
    """A prompt/completion dataset from (prompt, completion) pairs."""
    return Dataset(PROMPT_COMPLETION, tuple(Example(prompt=p, completion=c) for p, c in pairs), source)


def from_texts(texts, source: str = "<generated>") -> Dataset:
    """A text dataset from strings."""
    return Dataset(TEXT, tuple(Example(text=t) for t in texts), source)
