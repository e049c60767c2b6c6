"""Model builders and training-step helpers shared by the integration tests."""
import contextlib
import copy

import torch

from budget import assert_within_budget, floor, max_err
from tiny_models import tiny_model


def lora_model(family: str, seed: int = 0, lora_dropout: float = 0.0, targets="all-linear", **lora_kw):
    """A tiny model with PEFT LoRA whose B factors are random (init_lora_weights=False), never zero."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets,
                     init_lora_weights=False, **lora_kw)
    return get_peft_model(tiny_model(family, seed=seed), cfg)


def batch(seed: int = 0, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids, seed: int | None = None):
    """One training-mode forward/backward; returns (loss, {param name: grad or None}) and clears grads."""
    model.train()
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    if loss.requires_grad:  # nothing trainable reaches the loss when adapters are merged or disabled
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def model_depth(model, ids: torch.Tensor) -> int:
    """A chain depth for budget.py: the tokens (weight gradients sum over them) plus every Linear's
    input and output sizes (forward and backward products), plus a few elementwise roundings per layer."""
    dims = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return ids.numel() + dims + 4 * sum(1 for _ in model.modules())


@contextlib.contextmanager
def in_float64(model):
    """The model's floating-point parameters and buffers in float64 for the duration, then back to
    their own dtypes (float32 -> float64 -> float32 is exact, so the model is left as it was)."""
    dtypes = {id(t): t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    model.double()
    try:
        yield model
    finally:
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in dtypes:
                t.data = t.data.to(dtypes[id(t)])


def assert_same_training_step(a, b, ids, seed=None, compute_dtype=None):
    """One training step of ``a`` (under test) against ``b`` (the reference: the unpatched model, or
    one patched with the torch backend): loss and every gradient within budget.py's error budget,
    anchored to ``b`` run in float64 with the same seed (so the same masks, dropout draws and
    dropping decisions). ``compute_dtype``: the precision the math runs in (e.g. bfloat16 under
    autocast); default: each gradient's dtype. Returns a's (loss, grads)."""
    la, ga = loss_and_grads(a, ids, seed)
    assert_step_within_budget(la, ga, b, ids, seed, compute_dtype)
    return la, ga


def assert_step_within_budget(la, ga, b, ids, seed=None, compute_dtype=None):
    """The checks of assert_same_training_step for a loss and gradients already computed."""
    lb, gb = loss_and_grads(b, ids, seed)
    with in_float64(b):
        l64, g64 = loss_and_grads(b, ids, seed)
    depth = model_depth(b, ids)
    assert ga.keys() == gb.keys() == g64.keys()
    for name, ours, ref, exact in [("loss", la, lb, l64), *((n, ga[n], gb[n], g64[n]) for n in ga)]:
        assert (ours is None) == (ref is None) == (exact is None), name
        if ours is None:
            continue
        dtype = compute_dtype or ours.dtype
        # The float64 run must be the same computation as b's (same draws): its distance to b is a
        # rounding error. Otherwise the budget below would be meaningless.
        assert max_err(ref, exact) <= 1e3 * floor(dtype, depth, exact.abs().max().item()) + 1e-300, \
            f"{name}: the float64 run of the reference is not the same computation (different random draws?)"
        assert_within_budget(ours, ref, exact, dtype, depth, name)


def twin(model):
    return copy.deepcopy(model)


def mlps(model):
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [layer.mlp for layer in hf.model.layers]


# The CUDA library's C functions one masked gated MLP step calls on "cuda" (bf16 base, fp32 adapters at
# rank <= 32 with LoRA dropout; frozen bases), besides the activation backward: shared by the GPU test
# and its emulated twin (test_cuda_emulation.py), so that a change of path shows on CPU first.
FUSED_MLP_CALLS = frozenset({"transpeft_lora_shrink", "transpeft_lora_expand", "transpeft_masked_gated_act_fwd",
                             "transpeft_lora_token_reduce"})
# the activation backward by TRANSPEFT_CUDA_ONE_PASS_BWD
ACT_BWD_CALLS = {"1": "transpeft_act_bwd_lora", "0": "transpeft_masked_gated_act_bwd"}


def spy_cuda_calls(monkeypatch) -> list[str]:
    """Names of the CUDA library's C functions called from now on (a silent fallback to torch would
    leave the list empty)."""
    from transpeft_kernels.kernels.cuda import library

    seen: list[str] = []
    original = library.Library.call

    def spy(self, name, *args):
        seen.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(library.Library, "call", spy)
    return seen

# Activation inputs far outside any real model's range: the sigmoid's power overflows (g < -88 for silu),
# the cubic of gelu_tanh overflows (|g| > 1.2e13), and fp32's extremes.
EXTREME_G = (-3e38, -1e20, -2e13, -1e13, -200.0, -100.0, -88.0, -30.0, -12.0, 12.0, 30.0, 88.0, 1e13, 1.2e13, 1e15,
             1e19, 3e38)


def assert_act_at_extremes(fwd, bwd, activation) -> None:
    """``fwd(g, u)`` -> h' and ``bwd(dh, g, u)`` -> (dg, du) of an unmasked fp32 masked activation, on
    EXTREME_G: finite wherever the float64 reference is, and within 1e-5 relative or 1e-30 absolute of it
    (results below 2^-126 may flush to zero on the GPU). Documented exception: gelu_tanh's gradient is
    computed from g^2 and is finite while g^2 is, |g| < 1.8e19 (kernels/triton/activations.py)."""
    from transpeft_kernels.reference.activations import Activation, act, act_grad

    g = torch.tensor(EXTREME_G, dtype=torch.float32).repeat(3, 1)
    g = torch.cat([g, torch.zeros(3, 7)], 1)  # 24 columns: whole groups of 8
    u = torch.ones_like(g)
    h = fwd(g, u)
    dg, du = bwd(torch.ones_like(g), g, u)
    a, da = act(g.double(), activation), act_grad(g.double(), activation)
    for name, got, exact in (("h", h, a), ("dg", dg, da), ("du", du, a)):
        got = got.double().cpu()
        if name == "dg" and activation is Activation.GELU_TANH:
            inside = g.abs() < 1.8e19
            got, exact = got[inside], exact[inside]
        assert torch.isfinite(got).all(), (activation, name, got.tolist())
        err = (got - exact).abs()
        bad = err > 1e-5 * exact.abs() + 1e-30
        assert not bad.any(), (activation, name, g[bad].tolist(), got[bad].tolist(), exact[bad].tolist())


def capture_and_replay(step, warmup: int = 3):
    """Run ``step()`` (-> list of CUDA tensors) ``warmup`` times on a side stream (plans, compiles and any
    tuning happen there), then capture one call into a CUDA graph and replay it twice. Capture raises
    on what a graph cannot hold: a host sync, a pageable host-to-device copy, work on another stream.
    Returns (the last eager outputs, the first replay's, the second replay's), cloned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            eager = [t.detach().clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([t.detach().clone() for t in static])
    return eager, replays[0], replays[1]


@contextlib.contextmanager
def pretend_triton_arch(arch: str):
    """Triton launchers that take ``arch`` ("sm_80", "sm_90") for the architecture of every device: its
    fold limits and default configs, run in the interpreter (or on whatever GPU is here). The tuner is off
    (it would time nothing in the interpreter and cache the default under the pretend architecture), and
    the launch plans are cleared on entry and exit, so that none built for the real architecture is
    reused, nor any pretend one kept."""
    import pytest
    from transpeft_kernels.kernels.triton import configs, plans

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSPEFT_TRITON_AUTOTUNE", "0")
        mp.setattr(configs, "arch_of", lambda device: arch)
        mp.setattr(configs, "_CACHE", {})
        plans.clear_all()
        try:
            yield
        finally:
            plans.clear_all()
