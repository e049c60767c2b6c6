"""Launch configurations: the tuner's key follows the operands' layouts, and with autotuning off every
launch uses the fixed config (reproducible bits). The tuner is driven with a stand-in timer, so this
runs without a GPU."""
import pytest
import torch

triton = pytest.importorskip("triton")
from transpeft_kernels.kernels.triton import configs  # noqa: E402


def test_layout_key_sees_transpose_and_alignment():
    x = torch.empty(64, 32)
    assert configs.layout_key(x) == ((True, True),)
    assert configs.layout_key(x.t()) == ((False, True),)
    assert configs.layout_key(x[:, 1:]) == ((True, False),)  # address 4 bytes past a 16-byte boundary
    assert configs.layout_key(torch.empty(64, 33)) == ((True, False),)  # 132-byte rows
    assert configs.layout_key(x, None) == ((True, True), None)
    assert configs.layout_key(torch.empty(64, 33, device="meta")) == ((True, True),)  # nothing to align


@pytest.fixture
def tuner(monkeypatch):
    """choose() on a pretend sm_90 device with a timer that prefers the last candidate."""
    timed = []

    def fake_bench(fn, warmup, rep):
        fn()
        return 1.0 / len(timed)

    monkeypatch.setattr(configs, "arch_of", lambda device: "sm_90")
    monkeypatch.setattr(configs, "max_shared_per_block", lambda index: configs.SHARED_LIMIT["sm_90"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(configs.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(configs, "_CACHE", {})
    return timed


def test_tuner_runs_once_per_key_and_again_for_another_layout(tuner, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "1")
    fam, dev = configs.GEMM, torch.device("cuda")
    x = torch.empty(128, 64)

    def choose(t):
        return configs.choose(fam, dev, ("k", configs.layout_key(t)), 2, tuner.append)

    best = choose(x)
    n = len(tuner)
    assert n == len(fam.configs("sm_90")) and best == fam.configs("sm_90")[-1]
    assert choose(torch.empty(128, 64)) == best and len(tuner) == n  # same key: cached
    choose(x.t())
    assert len(tuner) == 2 * n  # transposed operand: tuned again


def test_autotune_off_uses_the_fixed_config_without_timing(tuner, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "0")
    for fam in configs.CONFIG_SETS.values():
        assert configs.choose(fam, torch.device("cuda"), ("k",), 2, tuner.append) == fam.default["sm_90"]
    assert tuner == []


def test_fp32_operands_get_their_own_default_where_the_16_bit_one_spills(tuner, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm_80")
    fam, dev = configs.GATE_UP, torch.device("cuda")
    fp32 = fam.fp32_default["sm_80"]
    assert fp32 != fam.default["sm_80"]
    assert configs.choose(fam, dev, ("k",), 4, tuner.append) == fp32
    assert configs.choose(fam, dev, ("k",), 2, tuner.append) == fam.default["sm_80"]
    assert fam.default_for("sm_90", 4) == fam.default["sm_90"]  # no fp32 default there: the one default
    # the tuner's candidates: the dtype's default first, the others once each
    for size in (2, 4):
        cands = fam.configs("sm_80", size)
        assert cands[0] == fam.default_for("sm_80", size) and len(set(cands)) == len(cands)
        assert set(cands) == {fam.default["sm_80"], *fam.candidates["sm_80"]} | ({fp32} if size == 4 else set())
    # compile-check compiles each case with the default its launches get
    from transpeft_kernels.kernels.triton import variants as V

    fp32_gate_up = [v for v in V.variants("sm_80") if v.label.startswith("gate_up ") and "x=fp32" in v.label]
    assert fp32_gate_up and all(v.constexprs["BLOCK_K"] == fp32["BLOCK_K"] for v in fp32_gate_up)


def test_the_folds_configs_fit_where_compile_check_says_they_do():
    """The one-pass backward's dh' fold: every architecture's default fits it at every rank the architecture
    folds (``configs.choose`` keeps the default without asking ``fits``); above rank 16 no 32-row candidate
    is tried; and compile-check builds exactly what the launchers can run: the rank-64 fold for sm_90 only,
    no 32-row tiles above rank 16."""
    import importlib

    from transpeft_kernels.kernels.triton import variants as V

    abl = importlib.import_module("transpeft_kernels.kernels.triton.act_bwd_lora")  # the module, not its function

    fam = configs.ACT_BWD_LORA
    for arch in ("sm_80", "sm_90"):
        assert abl.config_fits(fam.default_for(arch, 2), abl.FOLD_MAX_RANK[arch], True)
        tall = [c for c in fam.configs(arch, 2) if c["BLOCK_M"] > 16]
        assert all(abl.config_fits(c, 16, True) and not abl.config_fits(c, 32, True) for c in tall)
        assert all(abl.config_fits(c, 64, False) for c in tall)  # without the fold nothing is left out
        folds = [v for v in V.variants(arch) if v.label.startswith("act_bwd_lora") and v.label.endswith(" fold")]
        ranks = {v.constexprs["BLOCK_RD"] for v in folds}
        assert max(ranks) == abl.FOLD_MAX_RANK[arch]
        assert all(v.constexprs["BLOCK_M"] == 16 for v in folds if v.constexprs["BLOCK_RD"] > 16)
        assert any(v.constexprs["BLOCK_M"] > 16 for v in folds if v.constexprs["BLOCK_RD"] == 16) == bool(tall)


@pytest.mark.parametrize("capability,shared,arch", [
    ((9, 0), 232448, "sm_90"),   # H100 / H200
    ((10, 0), 232448, "sm_90"),  # B200: as much shared memory per block
    ((12, 0), 101376, "sm_80"),  # RTX 50 series: 99 KB per block, where sm_90 configs take up to 192 KB
    ((8, 9), 101376, "sm_80"),   # RTX 40 series, L4, L40S
    ((8, 0), 166912, "sm_80"),   # A100
])
def test_a_gpu_gets_the_config_tables_its_shared_memory_holds(monkeypatch, capability, shared, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(configs, "max_shared_per_block", lambda index: shared)
    configs._cuda_arch.cache_clear()
    try:
        assert configs._cuda_arch(0) == arch
    finally:
        configs._cuda_arch.cache_clear()


def test_every_sm_80_default_fits_99_kb_of_shared_memory():
    """The GPUs on sm_80's tables with the least shared memory (RTX 30/40/50 series: 99 KB per block) run
    every family's sm_80 default, by the families' own estimates (compile-check records the compiled
    figure: sass_round2_*.json's ``shared``)."""
    for fam in configs.CONFIG_SETS.values():
        if fam.smem is None:
            continue
        for size in (2, 4):
            assert fam.smem(fam.default_for("sm_80", size), size) <= 101376, (fam.name, size)
