"""Data parallel: dropping must not break DDP (find_unused_parameters False or True) and must make the
same decisions on every rank for the same seed. Two CPU ranks over gloo."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")


DEADLINE_S = 240


def _worker(rank: int, world: int, out_dir: str, find_unused: bool, steps: int):
    import transpeft_kernels as tpk
    from helpers import batch, lora_model, mlps
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A file rendezvous: no port to race for; a bounded timeout: a bug fails instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = lora_model("llama", seed=0, targets=["gate_proj", "up_proj", "down_proj"])
        tpk.patch(model, masking=0.1, dropping=0.5)
        skips = []
        for i, mlp in enumerate(mlps(model)):
            mlp.gate_proj.register_forward_hook(lambda *a, i=i: skips.append(i))  # logs layers that ran
        ddp = DDP(model, find_unused_parameters=find_unused)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        torch.manual_seed(123)  # the same seed on every rank: the same dropping decisions
        for step in range(steps):
            ids = batch(seed=1000 * rank + step)  # different data per rank
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"params": state, "ran": skips}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_with_dropping_trains_and_keeps_ranks_identical(tmp_path, find_unused):
    steps = 6
    ctx = mp.spawn(_worker, args=(2, str(tmp_path), find_unused, steps), nprocs=2, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > DEADLINE_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {DEADLINE_S} s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["ran"] == r1["ran"], "dropping decisions differ between ranks"
    assert len(r0["ran"]) < 2 * steps, "no FFN was skipped: the test did not exercise dropping"
    for name in r0["params"]:
        torch.testing.assert_close(r0["params"][name], r1["params"][name], atol=0, rtol=0)
