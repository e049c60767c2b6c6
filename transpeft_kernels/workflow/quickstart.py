"""The built-in default job: patch a small Llama-shaped model built from a config, train a LoRA
adapter for a few steps with masking and dropping on, and show that eval mode is untouched.

Runs in seconds on a CPU; downloads nothing. The tokens are synthetic counting sequences
(start + k * step mod 256, random start and step), so the loss visibly falls within a few dozen steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..integration import patch, unpatch


@dataclass(frozen=True)
class QuickstartConfig:
    steps: int = 40
    batch: int = 8
    seq_len: int = 32
    masking: float = 0.1
    dropping: float = 0.1
    backend: str = "auto"
    seed: int = 0


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _with_lora(model):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return model, "full fine-tuning (peft is not installed)"
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    return get_peft_model(model, cfg), "LoRA r=8, alpha=16, lora_dropout=0.05 on all linear layers"


def _batch(gen: torch.Generator, cfg: QuickstartConfig) -> torch.Tensor:
    start = torch.randint(0, 256, (cfg.batch, 1), generator=gen)
    step = torch.randint(1, 4, (cfg.batch, 1), generator=gen)
    return (start + step * torch.arange(cfg.seq_len)) % 256


def run(cfg: QuickstartConfig = QuickstartConfig(), log=print) -> dict:
    torch.manual_seed(cfg.seed)
    model, how = _with_lora(_model())
    log(f"model: Llama-shaped, 4 layers, d=64, I=176, built from a config; {how}")
    report = patch(model, masking=cfg.masking, dropping=cfg.dropping, backend=cfg.backend)
    log(str(report))

    gen = torch.Generator().manual_seed(cfg.seed)
    probe = _batch(gen, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ids = _batch(gen, cfg)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 5 == 0 or step == cfg.steps:
            log(f"step {step:>3}  train loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    tokens_per_s = cfg.steps * cfg.batch * cfg.seq_len / elapsed

    unpatch(model)
    model.eval()
    with torch.no_grad():
        # Weights changed during training, so compare the patched eval forward on the trained model.
        eval_unpatched = model(input_ids=probe).logits
    patch(model, masking=cfg.masking, dropping=cfg.dropping, backend=cfg.backend)
    model.eval()
    with torch.no_grad():
        eval_patched_after = model(input_ids=probe).logits
    eval_identical = torch.equal(eval_unpatched, eval_patched_after)
    log(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} over {cfg.steps} steps, {tokens_per_s:,.0f} tokens/s")
    log(f"eval logits with and without the patch identical: {eval_identical}")
    return {"losses": losses, "tokens_per_s": tokens_per_s, "eval_identical": eval_identical, "report": report}
