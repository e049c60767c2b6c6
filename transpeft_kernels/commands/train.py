"""``train``: one LoRA adapter on a patched PEFT model; saves a plain PEFT adapter and a training log."""
from __future__ import annotations

import argparse

NAME = "train"
HELP = ("train a LoRA adapter with Trans-PEFT masking/dropping (0 and 0: vanilla LoRA) on JSONL data; saves a "
        "PEFT adapter (safetensors) and train_log.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="model directory (safetensors + tokenizer) or GGUF file")
    p.add_argument("--data", required=True, help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line')
    p.add_argument("--out", required=True, help="directory for the adapter and train_log.json")
    p.add_argument("--masking", type=float, default=0.0, help="knowledge masking probability (default 0)")
    p.add_argument("--dropping", type=float, default=0.0, help="knowledge dropping probability per layer (default 0)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="module names to adapt, or all-linear (default q_proj k_proj v_proj o_proj)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, linear decay (default 2e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    p.add_argument("--backend", default="auto", help="auto, torch, triton or cuda (default auto)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and masks (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint (adapter, optimizer, scheduler, random states, data position) every N "
                        "optimizer steps under OUT/checkpoint (default 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (same arguments): ends with the same adapter as an uninterrupted run")


def run(args: argparse.Namespace) -> int:
    from ..workflow.jobs import TrainRequest, train

    train(TrainRequest(
        base=args.base, data=args.data, out=args.out, masking=args.masking, dropping=args.dropping, r=args.r,
        alpha=args.alpha, targets=tuple(args.targets), lora_dropout=args.lora_dropout, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing, backend=args.backend, max_length=args.max_length,
        seed=args.seed, progress=not args.no_progress, checkpoint_every=args.checkpoint_every, resume=args.resume))
    return 0
