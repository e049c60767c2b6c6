"""``transfer``: evaluate existing PEFT adapters on an old and a new base; optionally gate on retention."""
from __future__ import annotations

import argparse

NAME = "transfer"
HELP = ("evaluate PEFT adapters on the old and the new base (loss; exact-match accuracy for prompt/completion "
        "data) and report retention; exit 1 when any retention is below --min-retention")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--old-base", required=True, help="model directory or GGUF file the adapters were trained on")
    p.add_argument("--new-base", required=True, help="the updated model directory or GGUF file")
    p.add_argument("--data", required=True, help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line')
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--min-retention", type=float, default=None, metavar="X",
                   help="exit 1 when an adapter keeps less than X (new/old accuracy, or perplexity ratio for text)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per evaluation batch (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter directories")


def run(args: argparse.Namespace) -> int:
    from ..workflow.jobs import TransferRequest, transfer

    _, passed = transfer(TransferRequest(
        old_base=args.old_base, new_base=args.new_base, data=args.data, adapters=tuple(args.adapters),
        json_out=args.json_out, min_retention=args.min_retention, max_length=args.max_length,
        batch_size=args.batch_size, progress=not args.no_progress))
    return 0 if passed else 1
