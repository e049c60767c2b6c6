"""torch.compile of a patched model (torch backend, CPU inductor)."""
import pytest
import torch

import transpeft_kernels as tpk
from transpeft_kernels.integration import patch_settings
from helpers import assert_step_within_budget, batch, lora_model, loss_and_grads, twin

pytest.importorskip("peft")


def _strip(grads):
    return {k.replace("_orig_mod.", ""): v for k, v in grads.items()}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_compiled_step_equals_eager_without_masking_and_dropping(family):
    model = lora_model(family)
    eager = twin(model)
    tpk.patch(model, masking=0.0, dropping=0.0)
    tpk.patch(eager, masking=0.0, dropping=0.0)
    compiled = torch.compile(model)
    lc, gc = loss_and_grads(compiled, batch())
    # inductor's generated C++ vectorises for this host's CPU: judged by the float64 budget
    assert_step_within_budget(lc, _strip(gc), eager, batch())


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_masked_and_dropping_model_compiles_without_graph_breaks(family):
    model = lora_model(family, lora_dropout=0.1)
    tpk.patch(model, masking=0.2, dropping=0.3)
    model.train()
    # llama's attention carries the kernels package's wrappers when that package is installed (the
    # FFN skip is then a torch.where); phi3's does not (a torch.cond): both paths get traced
    wrapped = any("_kernel_funcs" in m.__dict__ for m in model.modules())
    assert all(p.skip_by_cond != wrapped for p in patch_settings(model).values())
    ids = batch()
    # use_cache=False as in training; the decision to skip is a torch.cond, the seeds are tensors.
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]


def test_compiled_masked_model_trains():
    model = lora_model("qwen2")
    tpk.patch(model, masking=0.2, dropping=0.3)
    compiled = torch.compile(model)
    compiled.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        torch.manual_seed(step)
        ids = batch(0)
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
