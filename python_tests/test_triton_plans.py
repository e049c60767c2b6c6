"""Launch plans (kernels/triton/plans.py): a launcher's checks, config and launch arguments are worked
out once per operand signature and reused. These tests check that a plan is reused only where the
signature says it may be (shape, strides, dtype, alignment, options), that bad arguments raise on every
call, and that the autotuner's path (which only GPUs take) launches every candidate on scratch
buffers without touching the results: driven here in the interpreter on a pretend sm_90 device."""
import pytest
import torch

triton = pytest.importorskip("triton")
from test_ops import assert_matches, make_linear, make_mlp  # noqa: E402
from transpeft_kernels import ops, reference as R  # noqa: E402
from transpeft_kernels.kernels import triton as K  # noqa: E402
from transpeft_kernels.kernels.env import interpreting  # noqa: E402
from transpeft_kernels.kernels.triton import configs, plans  # noqa: E402
from transpeft_kernels.ops.triton_backend import TritonBackend  # noqa: E402
from transpeft_kernels.specs import Layout, MaskSpec  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreting(),
                                reason="needs a GPU or TRITON_INTERPRET=1 for the kernels to launch")
BACKEND = TritonBackend()


def _shrink_ref(x, a, dropout=0.0, seed=None):
    xd = x.to(a.dtype) if dropout == 0 else R.lora_dropout(x.to(a.dtype), dropout, seed)
    return (xd.double() @ a.double().t())


def test_a_plan_is_reused_for_the_same_signature_only():
    cache = plans.plan_cache("lora_shrink")
    cache.clear()
    a = torch.randn(4, 40)
    x = torch.randn(24, 40)
    s1 = K.lora_shrink(x, a)
    assert len(cache) == 1
    s2 = K.lora_shrink(torch.randn(24, 40), a)  # same shape, strides, dtype: the same plan
    assert len(cache) == 1
    wide = torch.randn(40, 24).t()  # another layout
    s3 = K.lora_shrink(wide, a)
    assert len(cache) == 2
    buf = torch.randn(24 * 40 + 1)
    odd = buf[1:].view(24, 40)  # an address 4 bytes past a 16-byte boundary
    s4 = K.lora_shrink(odd, a)
    assert len(cache) == 3
    K.lora_shrink(torch.randn(7, 40), a)  # another token count
    assert len(cache) == 4
    for s, xi in ((s1, x), (s3, wide), (s4, odd)):
        torch.testing.assert_close(s.double(), _shrink_ref(xi, a), rtol=1e-5, atol=1e-5)
    assert s2.shape == (24, 4)


def test_options_are_part_of_the_signature():
    """Dropout on and off, another probability, an out tensor: each its own plan, each right."""
    a = torch.randn(4, 40)
    x = torch.randn(24, 40)
    seed = torch.tensor(11)
    plain, dropped, more = K.lora_shrink(x, a), K.lora_shrink(x, a, 0.1, seed), K.lora_shrink(x, a, 0.3, seed)
    torch.testing.assert_close(plain.double(), _shrink_ref(x, a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dropped.double(), _shrink_ref(x, a, 0.1, seed), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(more.double(), _shrink_ref(x, a, 0.3, seed), rtol=1e-5, atol=1e-5)
    out = torch.full((24, 4), float("nan"))
    assert K.lora_shrink(x, a, out=out) is out
    torch.testing.assert_close(out, plain)


def test_bad_arguments_raise_on_every_call():
    a = torch.randn(4, 40)
    x = torch.randn(24, 40)
    for _ in range(2):
        with pytest.raises(ValueError, match="dropout"):
            K.lora_shrink(x, a, 1.5, torch.tensor(1))
        with pytest.raises(ValueError, match="seed"):
            K.lora_shrink(x, a, 0.1)
        with pytest.raises(ValueError, match="columns"):
            K.lora_shrink(torch.randn(24, 41), a)
    K.lora_shrink(x, a, 0.1, torch.tensor(1))  # the same shapes with good options still run
    with pytest.raises(ValueError, match="seed"):
        K.lora_shrink(x, a, 0.1)  # a cached plan with dropout does not skip the seed check


def test_switching_autotuning_takes_effect_on_the_next_call(monkeypatch):
    seen = []
    real = configs.choose

    def spy(family, device, key, elem, launch):
        seen.append(configs.autotune_enabled())
        return real(family, device, key, elem, launch)

    monkeypatch.setattr(configs, "choose", spy)
    plans.clear_all()
    a, x = torch.randn(4, 40), torch.randn(24, 40)
    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "0")
    K.lora_shrink(x, a)
    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "1")
    K.lora_shrink(x, a)
    assert seen[-2:] == [False, True]


@pytest.fixture
def tuning(monkeypatch):
    """Every launcher's tuner on a pretend sm_90 device: each candidate config is launched (in the
    interpreter), the last one wins. The plans and tuned configs are cleared before and after."""
    timed = []

    def fake_bench(fn, warmup, rep):
        fn()
        timed.append(1)
        return 1.0 / len(timed)

    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm_90")
    monkeypatch.setattr(configs.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(configs, "_CACHE", {})
    plans.clear_all()
    yield timed
    plans.clear_all()


def test_tuned_lora_linear_matches_the_reference(tuning):
    """The tuner runs shrink, expand and token_reduce candidates on scratch buffers: the in-place
    expand must not add its term twice, and the chosen plans must give the reference's gradients."""
    w = make_linear(40, 24, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1)
    x = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor(5)
    assert_matches(lambda x, w: ops.lora_linear(x, w, seed, BACKEND), lambda x, w: R.lora_linear(x, w, seed),
                   x, w, torch.bfloat16, tf32x3=True)
    assert len(tuning) > 6  # several candidates of several launchers were timed


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_tuned_masked_gated_mlp_matches_the_reference(tuning, layout):
    """gate_up_lora_act (in place on g and u: tuned on strided copies of the fused halves) and the
    one-pass backward act_bwd_lora (partials per candidate's split) under the tuner."""
    w = make_mlp(24, 40, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1)
    x = torch.randn(2, 9, 24, dtype=torch.bfloat16, requires_grad=True)
    seed, mask = torch.tensor(8), MaskSpec(0.2, rescale=True)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.bfloat16, tf32x3=True)
    assert len(tuning) > 10


@pytest.mark.parametrize("rank,tall_tiles", [(16, True), (32, False), (64, False)])
def test_the_tuner_leaves_out_the_folds_spilling_candidates(tuning, monkeypatch, rank, tall_tiles):
    """act_bwd_lora with the dh' fold on a pretend sm_90: above rank 16 the tuner tries no candidate with
    32-row tiles (they spill there: act_bwd_lora.config_fits), at rank 16 it does; the default is tried
    either way, and the folded gradients stay those of the unfused pass."""
    from transpeft_kernels.kernels.triton import direct_launch

    launched = []
    real = direct_launch.launch
    monkeypatch.setattr(direct_launch, "launch", lambda kernel, plan, *a: launched.append(plan.meta) or real(kernel, plan, *a))
    M, I = 21, 72
    g, u, dh = (torch.randn(M, I).bfloat16() for _ in range(3))
    t, a = torch.randn(M, rank).bfloat16(), torch.randn(rank, I).bfloat16()
    side = K.LoraSide(torch.randn(M, rank).bfloat16(), 0.5)
    folded = K.act_bwd_lora(dh, g, u, "silu", gate=side, up=side, down=K.DownLora(t, 0.75, a=a))
    rows = {m["BLOCK_M"] for m in launched}
    assert (32 in rows) == tall_tiles and 16 in rows and len(launched) >= 3
    ref = K.act_bwd_lora(K.lora_expand_add(dh.clone(), t, a.t(), 0.75), g, u, "silu", gate=side, up=side,
                         down=K.DownLora(t, 0.75))
    assert torch.equal(folded.dA_d, ref.dA_d)
