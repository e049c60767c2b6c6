"""Evaluation of a model (a base, or a base with an adapter) on a dataset: the mean next-token loss over
the targets, and for prompt/completion data the exact-match accuracy of greedy decoding."""
from __future__ import annotations

import torch

from .data import Dataset
from .training import collate, encode, token_losses


def normalize_answer(text: str) -> str:
    """What exact match compares: the first line of the text, stripped of surrounding whitespace."""
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


@torch.no_grad()
def mean_loss(model, tokenizer, dataset: Dataset, max_length: int, batch_size: int = 16,
              desc: str = "loss", progress: bool = True) -> float:
    """Token-weighted mean cross-entropy over every target token of ``dataset`` (nats per token)."""
    from tqdm.auto import tqdm

    items = encode(dataset, tokenizer, max_length)
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        loss, n = token_losses(model, collate(items[start:start + batch_size], tokenizer.pad_token_id))
        total += float(loss)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, dataset: Dataset, max_length: int, batch_size: int = 32,
                desc: str = "accuracy", progress: bool = True) -> tuple[float, list[str]]:
    """(fraction of prompts whose greedy continuation, up to EOS or a newline, equals the completion after
    ``normalize_answer``, the decoded answers). Decoding runs at most as many tokens as the longest
    reference completion plus two, which is enough for any exact match."""
    from tqdm.auto import tqdm

    if not dataset.has_completions:
        raise ValueError("accuracy needs prompt/completion data")
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    correct = 0
    examples = dataset.examples
    model.eval()
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer(ex.prompt, add_special_tokens=True)["input_ids"][-(max_length - 2):] for ex in chunk]
        new = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in chunk) + 2
        tokens = _greedy(model, prompts, tokenizer.pad_token_id, eos, new)
        for ex, out in zip(chunk, tokens):
            if eos in out:
                out = out[:out.index(eos)]
            text = tokenizer.decode(out, skip_special_tokens=True)
            answers.append(text)
            correct += normalize_answer(text) == normalize_answer(ex.completion)
    return correct / len(examples), answers


def _greedy(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new: int) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with a KV cache; rows that emitted EOS stop growing."""
    batch = collate([_as_item(p) for p in prompts], pad_id)
    device = next(model.parameters()).device
    ids, mask, pos = (batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
    cache_arg = _cache_keyword(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                generated[row].append(tok)
        done |= nxt == eos_id
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache})
        cache = _cache_of(out)
    return generated


def _cache_keyword(model) -> str:
    """The forward keyword for the KV cache: transformers 5.24 calls it ``cache``, earlier 5.x ``past_key_values``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _as_item(prompt: list[int]):
    from .training import IGNORE, Encoded

    return Encoded(prompt, [IGNORE] * len(prompt))


def evaluate(model, tokenizer, dataset: Dataset, max_length: int, batch_size: int = 16, desc: str = "eval",
             progress: bool = True) -> dict:
    """{"loss": mean target loss, "accuracy": exact match or None for text data, "n": records}."""
    loss = mean_loss(model, tokenizer, dataset, max_length, batch_size, desc=f"{desc} loss", progress=progress)
    accuracy = None
    if dataset.has_completions:
        accuracy, _ = exact_match(model, tokenizer, dataset, max_length, max(batch_size, 32),
                                  desc=f"{desc} accuracy", progress=progress)
    return {"loss": loss, "accuracy": accuracy, "n": len(dataset)}
