"""The reference math against autograd in float64, transformers' activations and real PEFT layers."""
import pytest
import torch
from torch import nn

from budget import assert_within_budget
from transpeft_kernels.reference import Activation, act, act_grad, activation_from_config_name, lora_linear, keep_mask
from transpeft_kernels.reference.lora import lora_dropout
from transpeft_kernels.specs import LinearWeights, LoraWeights


@pytest.mark.parametrize("activation", list(Activation))
def test_act_grad_matches_autograd_float64(activation):
    g = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(act(g, activation).sum(), g)
    torch.testing.assert_close(act_grad(g.detach(), activation), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_act_matches_transformers(name):
    from transformers.activations import ACT2FN

    g = torch.randn(1000) * 3
    ours, theirs = act(g, activation_from_config_name(name)), ACT2FN[name](g)
    if name != "gelu_new":
        assert torch.equal(ours, theirs)  # the same torch function: the same bits
    else:  # the tanh formula written out by hand: both within a few roundings of float64
        exact = act(g.double(), activation_from_config_name(name))
        assert_within_budget(ours, theirs, exact, torch.float32, 8, name)


def test_unknown_activation_names_the_value():
    with pytest.raises(ValueError, match="'relu'"):
        activation_from_config_name("relu")


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_linear_equals_peft_layer(base_dtype):
    peft = pytest.importorskip("peft")
    base = nn.Linear(24, 40, bias=True).to(base_dtype)
    holder = nn.Sequential()
    holder.add_module("proj", base)
    model = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)  # non-zero B: the LoRA branch matters
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's default on a low-precision base
    x = torch.randn(3, 5, 24, dtype=base_dtype)
    lin = LinearWeights(base.weight, base.bias, LoraWeights(
        layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]))
    with torch.no_grad():
        assert torch.equal(lora_linear(x, lin), layer(x))


def test_lora_dropout_keeps_and_scales():
    x = torch.ones(400, 300)
    q = 0.25
    y = lora_dropout(x, q, torch.tensor(5))
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - q)) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - q)))
    assert torch.equal(kept, keep_mask(torch.tensor(5), 400, 300, q))
    with pytest.raises(ValueError, match="seed"):
        lora_dropout(x, q, None)


def test_sub_seeds_are_the_base_plus_the_stream_made_once_and_refreshed_after_an_in_place_change():
    from transpeft_kernels.specs import SubSeed, sub_seed

    for base in (torch.tensor(123), torch.tensor([2**61 + 5])):
        keys = [sub_seed(base, s) for s in SubSeed]
        assert [int(k) for k in keys] == [int(base) + int(s) for s in SubSeed]
        assert all(k.shape == base.shape and k.dtype == torch.int64 for k in keys)
        # one addition for all streams: the keys are views of one tensor
        assert len({k.untyped_storage().data_ptr() for k in keys}) == 1
        base.fill_(7)  # a seed tensor reused with a new value gets new keys
        assert int(sub_seed(base, SubSeed.DOWN)) == 7 + int(SubSeed.DOWN)
    assert sub_seed(None, SubSeed.MASK) is None
