"""Per-item scoring for the study: one teacher-forced forward per item gives both numbers.

- ``correct``: greedy decoding would reproduce the gold answer token for token and then stop (EOS), i.e. the
  argmax at every answer position and at the EOS position is the gold token. This is exact match of greedy
  decoding on the gold tokenization, computed without decoding: one batched forward instead of one per
  generated token. (It is slightly stricter than ``evaluation.exact_match``, which also accepts another
  tokenization of the same text or a newline instead of EOS.)
- ``loss``: mean cross-entropy of the answer tokens and EOS (nats per token).

Items are batched by length (less padding), results are returned in the dataset's order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Dataset
from .training import IGNORE, collate, encode, target_logits


@torch.no_grad()
def score_items(model, tokenizer, dataset: Dataset, max_length: int, batch_size: int = 32,
                desc: str = "score", progress: bool = True) -> dict[str, list]:
    """{"correct": [0/1 per item], "loss": [nats per answer token per item]} in the order of ``dataset``."""
    from tqdm.auto import tqdm

    items = encode(dataset, tokenizer, max_length)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    correct = [0] * len(items)
    losses = [0.0] * len(items)
    device = next(model.parameters()).device
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in rows], tokenizer.pad_token_id).items()}
        logits, targets = target_logits(model, batch, int((batch["labels"] != IGNORE).any(0).nonzero()[0]))
        mask = targets != IGNORE
        ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
        hit = (logits.argmax(-1) == targets) | ~mask
        n = mask.sum(1).clamp(min=1)
        for j, i in enumerate(rows):
            correct[i] = int(hit[j].all())
            losses[i] = float(ce[j].sum() / n[j])
    return {"correct": correct, "loss": losses}
