"""patch()/unpatch() on tiny transformers models of every supported family, with and without PEFT."""
import os

import pytest
import torch
from torch import nn

import transpeft_kernels as tpk
from helpers import assert_same_training_step, batch, lora_model, loss_and_grads, mlps, twin
from tiny_models import FAMILIES, tiny_model
from transpeft_kernels import reference as R
from transpeft_kernels.integration import patch_settings
from transpeft_kernels.integration.projections import read_projection
from transpeft_kernels.specs import GatedMLPWeights, MaskSpec

pytest.importorskip("peft")


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_unpatched_when_masking_and_dropping_are_zero(family):
    model = lora_model(family)
    reference = twin(model)
    report = tpk.patch(model, masking=0.0, dropping=0.0)
    assert report.mlps_patched == 2
    assert all(c.fused == 2 and not c.fallback for c in report.projections.values())
    assert_same_training_step(model, reference, batch())


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_is_bit_identical_with_masking_and_dropping_on(family):
    model = lora_model(family, lora_dropout=0.1)
    reference = twin(model)
    tpk.patch(model, masking=0.3, dropping=0.5)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch()).logits, reference(input_ids=batch()).logits)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_training_forward_draws_seed_then_follows_the_reference(family):
    """The draw protocol: one randint(2**62) from the default generator per MLP call, then reference math."""
    model = lora_model(family, lora_dropout=0.1)
    tpk.patch(model, masking=0.3, dropping=0.0, mask_scale=True)
    mlp = mlps(model)[0]
    record = patch_settings(model)[0]
    x = torch.randn(2, 5, mlp.down_proj.out_features if hasattr(mlp.down_proj, "out_features") else 32)
    mlp.train()
    torch.manual_seed(42)
    y = mlp(x)
    torch.manual_seed(42)
    seed = torch.randint(2**62, (), dtype=torch.int64)
    projs = [read_projection(getattr(mlp, n)).weights for n in record.family.projection_names]
    expected = R.gated_mlp(x, GatedMLPWeights(tuple(projs[:-1]), projs[-1]), record.activation, MaskSpec(0.3, True), seed)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_mask_keeps_one_minus_p_without_rescale():
    model = tiny_model("llama")
    tpk.patch(model, masking=0.25, dropping=0.0)
    mlp = mlps(model)[0]
    mlp.train()
    captured = {}
    mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0].detach()))  # forces fallback of down_proj
    x = torch.randn(8, 64, 32)
    mlp(x)
    h = captured["h"]
    dense = R.act(mlp.gate_proj(x), R.Activation.SILU) * mlp.up_proj(x)
    kept = h != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(h[kept], dense[kept])  # kept values are not rescaled by default


@pytest.mark.parametrize("family", ["llama", "glm4", "cohere"])
def test_dropping_one_equals_a_zeroed_ffn(family):
    model = lora_model(family)
    reference = twin(model)
    for mlp in mlps(reference):
        mlp.forward = lambda x: torch.zeros_like(x)
    tpk.patch(model, masking=0.3, dropping=1.0)
    loss, grads = assert_same_training_step(model, reference, batch())
    assert all(grads[n] is None for n in grads if ".mlp." in n)


def test_dropping_rate_and_no_ffn_compute():
    model = tiny_model("llama")
    tpk.patch(model, masking=0.0, dropping=0.4)
    mlp = mlps(model)[0]
    mlp.train()
    calls = []
    mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))  # runs only when the FFN runs
    x = torch.randn(1, 3, 32)
    skipped = sum(bool((mlp(x) == 0).all()) for _ in range(500))
    assert 150 < skipped < 250
    assert len(calls) == 500 - skipped


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_same_masks_and_decisions(family, use_reentrant):
    model = lora_model(family, lora_dropout=0.1)
    tpk.patch(model, masking=0.3, dropping=0.3)
    plain = twin(model)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    for mlp in mlps(model):
        mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    for seed in range(3):
        assert_same_training_step(model, plain, batch(seed), seed=seed)
    assert len(calls) > 3 * 2  # the MLPs really were recomputed


def test_runs_reproduce_under_manual_seed():
    model = lora_model("qwen2", lora_dropout=0.1)
    tpk.patch(model, masking=0.3, dropping=0.3)
    l1, g1 = loss_and_grads(model, batch(), seed=7)
    l2, g2 = loss_and_grads(model, batch(), seed=7)
    l3, _ = loss_and_grads(model, batch(), seed=8)
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1 if g1[n] is not None)
    assert not torch.equal(l1, l3)


def test_unpatch_restores_the_original_forward_bit_identically():
    model = lora_model("llama")
    reference = twin(model)
    tpk.patch(model, masking=0.3, dropping=0.3)
    assert tpk.is_patched(model)
    assert tpk.unpatch(model) == 2
    assert not tpk.is_patched(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    l1, g1 = loss_and_grads(model, batch())
    l2, g2 = loss_and_grads(reference, batch())
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_state_dict_unchanged_and_saved_adapter_loads_in_stock_peft(tmp_path):
    from peft import PeftModel

    model = lora_model("llama", lora_dropout=0.05)
    keys = list(model.state_dict())
    tpk.patch(model, masking=0.2, dropping=0.2)
    assert list(model.state_dict()) == keys
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in range(2):
        model.train()
        model(input_ids=batch(seed), labels=batch(seed)).loss.backward()
        opt.step(), opt.zero_grad()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_model("llama", seed=0), tmp_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch()).logits, loaded(input_ids=batch()).logits)


def test_patching_again_replaces_settings_and_layers():
    model = lora_model("llama")
    tpk.patch(model, masking=0.1, dropping=0.1)
    report = tpk.patch(model, masking=0.2, dropping=0.0, layers=[1])
    assert report.patched_layers == [1]
    records = patch_settings(model)
    assert list(records) == [1] and records[1].settings.masking == 0.2
    assert "forward" not in mlps(model)[0].__dict__


def test_layers_selects_decoder_layers():
    model = lora_model("llama")
    reference = twin(model)
    tpk.patch(model, masking=0.0, dropping=1.0, layers=[0])
    for mlp in mlps(reference)[:1]:
        mlp.forward = lambda x: torch.zeros_like(x)
    assert_same_training_step(model, reference, batch())


BAD_ARGUMENTS = [
    (dict(masking=1.0), ValueError, "masking"),
    (dict(masking=-0.1), ValueError, "masking"),
    (dict(masking=float("nan")), ValueError, "masking"),
    (dict(masking="0.1"), TypeError, "masking"),
    (dict(masking=True), TypeError, "masking"),
    (dict(dropping=1.5), ValueError, "dropping"),
    (dict(mask_scale="yes"), TypeError, "mask_scale"),
    (dict(backend="jax"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(backend="cuda"), RuntimeError, "cuda"),
    (dict(layers=[5]), ValueError, "layers"),
    (dict(layers=[-1]), ValueError, "layers"),
    (dict(layers="0"), TypeError, "layers"),
    (dict(layers=[]), ValueError, "layers"),
    (dict(layers=[0.5]), TypeError, "layers"),
]


def test_triton_backend_is_available_with_cuda_or_the_interpreter():
    # conftest selects Triton's interpreter when there is no GPU, so backend="triton" patches here.
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("neither CUDA nor TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    model = lora_model("llama")
    tpk.patch(model, masking=0.1, backend="triton")
    assert all(r.settings.backend == "triton" for r in patch_settings(model).values())


def test_triton_backend_raises_without_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = lora_model("llama")
    tpk.patch(model, masking=0.1, dropping=0.1, layers=[0])
    before = {i: r.settings for i, r in patch_settings(model).items()}
    with pytest.raises(RuntimeError, match="triton"):
        tpk.patch(model, backend="triton")
    assert {i: r.settings for i, r in patch_settings(model).items()} == before


@pytest.mark.parametrize("kwargs,error,word", BAD_ARGUMENTS)
def test_bad_input_raises_and_leaves_the_model_as_it_was(kwargs, error, word):
    model = lora_model("llama")
    tpk.patch(model, masking=0.1, dropping=0.1, layers=[0])
    before = {i: r.settings for i, r in patch_settings(model).items()}
    with pytest.raises(error, match=word):
        tpk.patch(model, **kwargs)
    assert {i: r.settings for i, r in patch_settings(model).items()} == before
    fresh = lora_model("llama")
    with pytest.raises(error, match=word):
        tpk.patch(fresh, **kwargs)
    assert not tpk.is_patched(fresh)


def test_unsupported_models_raise_type_error_naming_the_class():
    with pytest.raises(TypeError, match="GPT2LMHeadModel.*supported"):
        tpk.patch(tiny_model("gpt2"))
    with pytest.raises(TypeError, match="Linear"):
        tpk.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        tpk.unpatch("not a model")


def test_moe_layers_are_left_alone_and_listed():
    model = tiny_model("qwen3_moe")
    report = tpk.patch(model, masking=0.1, dropping=0.0)
    assert report.patched_layers == [0]
    assert [(i, cls) for i, cls, _ in report.left_alone] == [(1, "Qwen3MoeSparseMoeBlock")]
    assert "left alone" in str(report)
    with pytest.raises(TypeError, match="no FFN that can be patched"):
        tpk.patch(model, layers=[1])
    loss_and_grads(model, batch())


def test_unsupported_activation_is_reported():
    model = tiny_model("llama", hidden_act="relu")
    with pytest.raises(TypeError, match="relu"):
        tpk.patch(model)


def test_full_finetuning_without_peft_reaches_base_weights():
    model = tiny_model("mistral")
    reference = twin(model)
    tpk.patch(model, masking=0.0, dropping=0.0)
    _, grads = assert_same_training_step(model, reference, batch())
    assert grads["model.layers.0.mlp.gate_proj.weight"] is not None


def test_transformers_peft_integration_add_adapter():
    from peft import LoraConfig

    model = tiny_model("qwen3")
    try:
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
                                     init_lora_weights=False))
    except ValueError as e:  # e.g. transformers 5.24 asks for a PEFT release newer than any published
        if "version of PEFT" in str(e):
            pytest.skip(f"transformers' PEFT integration unavailable with this PEFT: {e}")
        raise
    reference = twin(model)
    report = tpk.patch(model, masking=0.0, dropping=0.0)
    assert report.projections["down_proj"].fused == 2
    assert_same_training_step(model, reference, batch())


def test_report_lists_fused_and_fallback_projections():
    model = lora_model("llama", targets=["gate_proj", "down_proj"])
    model.base_model.model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: None)
    text = str(tpk.patch(model, masking=0.1, dropping=0.1))
    assert "patched 2 MLPs" in text and "backend=auto" in text
    assert "up_proj       fused   1, own forward   1" in text and "hooks" in text


FALLBACKS = {
    "dora": (dict(use_dora=True), None, "DoRA"),
    "lora_bias": (dict(lora_bias=True), None, "lora_bias"),
    "merged": ({}, lambda m: m.merge_adapter(), "merged"),
    "two_adapters": ({}, "two", "2 active adapters"),
    "pre_hook": ({}, lambda m: [mlp.gate_proj.register_forward_pre_hook(lambda mod, a: None) for mlp in mlps(m)], "hooks"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallbacks_keep_parity_and_still_mask(case):
    from peft import LoraConfig

    lora_kw, setup, reason = FALLBACKS[case]
    model = lora_model("llama", **lora_kw)
    if setup == "two":
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    elif setup is not None:
        setup(model)
    reference = twin(model)
    report = tpk.patch(model, masking=0.0, dropping=0.0)
    assert any(reason in r for c in report.projections.values() for r in c.fallback), str(report)
    assert_same_training_step(model, reference, batch())
    tpk.patch(model, masking=0.3, dropping=0.0)
    masked, _ = loss_and_grads(model, batch(), seed=1)
    assert not torch.allclose(masked, loss_and_grads(reference, batch())[0])


def test_disabled_adapters_fall_back_at_call_time():
    model = lora_model("llama")
    reference = twin(model)
    tpk.patch(model, masking=0.0, dropping=0.0)
    with model.disable_adapter(), reference.disable_adapter():
        assert_same_training_step(model, reference, batch())


def test_autocast_bf16_close_to_unpatched():
    model = lora_model("llama")
    reference = twin(model)
    tpk.patch(model, masking=0.0, dropping=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same_training_step(model, reference, batch(), compute_dtype=torch.bfloat16)
