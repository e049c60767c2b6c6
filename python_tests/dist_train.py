"""Training script launched by test_torchrun.py under torchrun (or plain python for one process):
plain, DDP, FSDP2, or DeepSpeed ZeRO-2/3 (modes zero2, zero3).

    torchrun --nproc_per_node=2 python_tests/dist_train.py --mode ddp --out DIR [--masking P --dropping P]

Each rank trains a tiny patched PEFT model (adapters on the FFN projections) on its own shard of a
fixed global batch and writes DIR/rank{R}.pt: final trainable parameters and the layers whose FFN ran.
"""
import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transpeft_kernels as tpk  # noqa: E402
from helpers import batch, lora_model, mlps  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 4, 10, 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("single", "ddp", "ddp_unused", "fsdp2", "zero2", "zero3"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--masking", type=float, default=0.1)
    ap.add_argument("--dropping", type=float, default=0.5)
    args = ap.parse_args()

    distributed = args.mode != "single"
    zero = args.mode.startswith("zero")
    if zero:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    elif distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    model = lora_model("llama", seed=0, targets=["gate_proj", "up_proj", "down_proj"])
    tpk.patch(model, masking=args.masking, dropping=args.dropping)
    ran = []
    for i, mlp in enumerate(mlps(model)):
        mlp.gate_proj.register_forward_hook(lambda *a, i=i: ran.append(i))
    if args.mode in ("ddp", "ddp_unused"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, find_unused_parameters=args.mode == "ddp_unused")
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    if zero:  # DeepSpeed ZeRO stage 2 or 3 on the CPU accelerator, with the same SGD
        trainable = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": int(args.mode[-1])}, "steps_per_print": 10**6,
                  "zero_allow_untested_optimizer": True}  # plain SGD, as the other modes use
        wrapped, opt, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                                  optimizer=torch.optim.SGD(trainable, lr=0.05))

    torch.manual_seed(123)  # the same seed on every rank: the same dropping decisions
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids = batch(seed=step, shape=(GLOBAL_BATCH, SEQ))[rank * per_rank:(rank + 1) * per_rank]
        loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
        if zero:
            # ZeRO-3: a step that skipped every FFN leaves no trainable parameter on the loss's path
            # here (adapters on the FFN only); DeepSpeed's backward refuses such a loss. The same on all
            # ranks (same seed, same dropping decisions).
            if loss.requires_grad:
                wrapped.backward(loss)
                wrapped.step()
            continue
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    params = {}
    gathered = []
    if args.mode == "zero3":  # every rank holds a shard: gather the full tensors to compare
        gathered = [p for p in model.parameters() if p.requires_grad]
    import contextlib

    gather = deepspeed.zero.GatheredParameters(gathered) if gathered else contextlib.nullcontext()
    with gather:
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
                params[name] = full.detach().clone()
    torch.save({"params": params, "ran": ran}, os.path.join(args.out, f"rank{rank}.pt"))
    if distributed:
        # Leave together and skip the gloo teardown: destroy_process_group after a peer has gone
        # intermittently blocks forever on these CPU machines, and the results are already on disk.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
