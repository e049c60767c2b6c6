"""QLoRA: a base loaded in 4-bit (nf4) or 8-bit with bitsandbytes (its CPU backend runs here), PEFT LoRA on
every linear layer, patched. The quantized projections keep their own forward (bitsandbytes dequantizes
inside it); the MLP forward is ours, so knowledge masking and dropping apply all the same.

Training-mode steps come before any eval-mode forward: on CPUs with AVX512-BF16, bitsandbytes (0.50) repacks
a 4-bit weight for inference on its first no-grad eval forward, and the repacked path has no backward
(torch warns that ``bitsandbytes::gemv_4bit`` has no autograd kernel; the gradient through the base weight is
then lost, for patched and unpatched models alike). That warning fails these tests."""
import pytest
import torch

import transpeft_kernels as tpk
from helpers import loss_and_grads
from transpeft_kernels.integration import patch_settings

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qbase")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _quantized_lora(path, bits):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
         if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu")
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


def _ffn_adapter_grads(grads):
    return {n: g for n, g in grads.items() if ".mlp." in n and "lora_" in n}


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_masks_drops_and_trains(base_dir, bits):
    model = _quantized_lora(base_dir, bits)
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    mlp = model.get_base_model().model.layers[0].mlp
    assert all(isinstance(getattr(mlp, p).base_layer, quantized) for p in PROJECTIONS)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = loss_and_grads(model, ids, seed=0)

    # The report: every quantized projection runs its own forward (no fused path for quantized bases).
    report = tpk.patch(model, masking=0.0, dropping=0.0)
    for p in PROJECTIONS:
        count = report.projections[p]
        assert count.fused == 0 and sum(count.fallback.values()) == 2, (p, count)
        assert all(quantized.__name__ in reason for reason in count.fallback), count.fallback
    assert all(s.settings.masking == 0.0 for s in patch_settings(model).values())

    # Masking and dropping at 0: the unpatched step (same ops for the loss; our activation backward).
    loss, grads = loss_and_grads(model, ids, seed=0)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() and _ffn_adapter_grads(grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")

    # Masking applies, redrawn per forward; dropping 1 skips every FFN (its adapters get no gradient).
    tpk.patch(model, masking=0.3, dropping=0.0)
    masked = [loss_and_grads(model, ids, seed=s)[0] for s in (0, 1)]
    assert masked[0] != plain_loss and masked[0] != masked[1]
    tpk.patch(model, masking=0.0, dropping=1.0)
    skipped, grads = loss_and_grads(model, ids, seed=0)
    assert skipped != plain_loss
    assert all(g is None for g in _ffn_adapter_grads(grads).values())

    # Both on: a finite loss, finite gradients on every adapter that was used, the FFN adapters among them.
    tpk.patch(model, masking=0.2, dropping=0.2)
    loss, grads = loss_and_grads(model, ids, seed=2)
    assert torch.isfinite(loss)
    used = {n: g for n, g in grads.items() if g is not None}
    assert _ffn_adapter_grads(used) and all(torch.isfinite(g).all() for g in used.values())
    assert any(g.abs().sum() > 0 for g in _ffn_adapter_grads(used).values())

    # Eval mode is untouched: patched logits equal the unpatched model's.
    model.eval()
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        assert tpk.unpatch(model) == 2
        torch.testing.assert_close(model(input_ids=ids).logits, patched, rtol=0, atol=0)
