"""QLoRA: a base loaded in 4-bit (nf4) or 8-bit with bitsandbytes (its CPU backend runs here), PEFT LoRA on
every linear layer, patched. The quantized projections keep their own forward (bitsandbytes dequantizes
inside it); the MLP forward is ours, so knowledge masking and dropping apply all the same."""
import pytest
import torch

import transpeft_kernels as tpk
from transpeft_kernels.integration import patch_settings

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


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


def _loss(model, ids, seed):
    torch.manual_seed(seed)
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_masks_drops_and_trains(base_dir, bits):
    model = _quantized_lora(base_dir, bits)
    layer_type = "Linear4bit" if bits == 4 else "Linear8bitLt"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        eval_before = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():
        plain = _loss(model, ids, 0)

    report = tpk.patch(model, masking=0.0, dropping=0.0)
    text = str(report)
    assert f"{layer_type} is not nn.Linear" in text  # each quantized projection runs its own forward
    assert all(s.settings.masking == 0.0 for s in patch_settings(model).values())
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, ids, 0), plain, rtol=0, atol=0)  # same ops, same bits

    tpk.patch(model, masking=0.3, dropping=0.0)
    with torch.no_grad():
        masked = [_loss(model, ids, s) for s in (0, 1)]
    assert masked[0] != plain and masked[0] != masked[1]  # the mask applies, and is redrawn per forward
    tpk.patch(model, masking=0.0, dropping=1.0)
    with torch.no_grad():
        assert _loss(model, ids, 0) != plain  # every FFN skipped
    tpk.patch(model, masking=0.2, dropping=0.2)
    loss = _loss(model, ids, 2)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if ".mlp." in n and "lora" in n)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, eval_before)  # eval mode untouched
