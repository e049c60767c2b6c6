"""What the benchmark measures: op-level cases, training-step cases, and the presets that pick them.

Shapes use the package's letters: M tokens (batch x sequence, flattened), d in-features (model width),
n out-features of a lora_linear, I intermediate width of a gated MLP, r LoRA rank. The shapes are those
of real models (Llama-3-8B, Qwen2.5-7B, Llama-3.2-1B); the weights are random.

Presets:
    smoke   tiny shapes, CPU-sized (CI; seconds). Says nothing about GPU speed.
    gpu     what ``benchmarks/gpu_run.sh`` runs on one H100/H200 in a few minutes: every op and shape
            family at its most informative settings, most important first (the runner stops at a time
            budget, so the order is the priority).
    full    the whole matrix of issue 5 (hours with torch.compile; for a long GPU session).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

OPS = ("lora_linear", "gated_mlp", "train_step")
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class ProjShape:
    """One attention projection of a model: x (M, d) -> (M, n). ``label`` names the projections that
    share this exact shape (k and v are identical, so they are measured once)."""

    model: str
    label: str
    d: int
    n: int
    bias: bool


@dataclass(frozen=True)
class MLPShape:
    model: str
    d: int
    I: int  # noqa: E741 - the package's name for the intermediate width


# q/k/v/o of Llama-3-8B (hidden 4096, 32 heads, 8 KV heads of 128) and Qwen2.5-7B (hidden 3584, 28 heads,
# 4 KV heads of 128; q/k/v carry a bias in Qwen2).
PROJ_SHAPES = (
    ProjShape("Llama-3-8B", "q,o", 4096, 4096, False),
    ProjShape("Llama-3-8B", "k,v", 4096, 1024, False),
    ProjShape("Qwen2.5-7B", "q", 3584, 3584, True),
    ProjShape("Qwen2.5-7B", "k,v", 3584, 512, True),
    ProjShape("Qwen2.5-7B", "o", 3584, 3584, False),
)
MLP_SHAPES = (
    MLPShape("Llama-3-8B", 4096, 14336),
    MLPShape("Qwen2.5-7B", 3584, 18944),
    MLPShape("Llama-3.2-1B", 2048, 8192),
)


@dataclass(frozen=True)
class OpCase:
    """One op-level configuration. ``n`` is set for lora_linear, ``I`` for gated_mlp (the other is None).
    ``masking`` applies to gated_mlp only (lora_linear has no intermediate to mask)."""

    op: str
    model: str
    label: str
    M: int
    d: int
    n: int | None
    I: int | None  # noqa: E741
    r: int
    lora_dropout: float
    masking: float
    bias: bool = False
    dtype: str = "bfloat16"
    passes: tuple[str, ...] = PASSES
    # torch's fp32 matmuls on CUDA during the case (kernels.env.cuda_fp32_matmul): "ieee" (torch's default)
    # or "tf32" (TF32 allowed: vanilla's fp32 LoRA matmuls in TF32, the triton backend's single tf32 products)
    fp32_matmul: str = "ieee"

    @property
    def random(self) -> bool:
        """Whether a forward draws a seed: LoRA dropout or masking on (as the patched MLP draws it)."""
        return self.lora_dropout > 0 or self.masking > 0

    @property
    def key(self) -> str:
        shape = f"{self.label} d={self.d} n={self.n}" if self.op == "lora_linear" else self.label
        tf32 = " tf32" if self.fp32_matmul == "tf32" else ""
        return f"{self.op} {self.model} {shape} M={self.M} r={self.r} q={self.lora_dropout}{tf32}"

    def fields(self) -> dict:
        f = asdict(self)
        f.pop("passes")
        return f


@dataclass(frozen=True)
class TrainCase:
    """A decoder stack built from a config with random weights, LoRA r on all linear layers.

    Tokens per step M = batch * seq. ``layers`` may be fewer than the model has (a few Llama-3-8B layers
    fit a short run); everything else is the model's real shape."""

    model: str
    layers: int
    d: int
    I: int  # noqa: E741
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    checkpointing: bool
    r: int = 16
    lora_dropout: float = 0.05
    masking: float = 0.1
    dropping: float = 0.1
    dtype: str = "bfloat16"
    steps: int = 10
    warmup: int = 3
    tie_embeddings: bool = False

    @property
    def M(self) -> int:
        return self.batch * self.seq

    @property
    def key(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "no-ckpt"
        return f"train_step {self.model} L={self.layers} M={self.M} r={self.r} {ckpt}"


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple[OpCase | TrainCase, ...]  # in priority order: the runner's budget cuts from the end
    device: str  # "cpu" or "cuda": where the preset is meant to run
    reps: int  # timed repetitions per measurement (medians of these)
    warmup: int
    check_tokens: int  # tokens of the numerics check (a slice of M keeps it cheap at 16k tokens)
    compile_backend: str = "inductor"
    cpu_threads: int | None = None  # torch.set_num_threads for the run; None leaves torch's choice
    compiled_cases: int | None = None  # vanilla_compiled only on the first N op cases (compiling costs ~10-60 s per shape)
    notes: tuple[str, ...] = field(default_factory=tuple)


def _lora_cases(shapes, tokens, ranks, dropouts, dtype, passes=PASSES, fp32_matmul="ieee"):
    return [
        OpCase("lora_linear", s.model, s.label, M, s.d, s.n, None, r, q, 0.0, s.bias, dtype, passes, fp32_matmul)
        for s, M, r, q in itertools.product(shapes, tokens, ranks, dropouts)
    ]


def _mlp_cases(shapes, tokens, ranks, dropouts, dtype, masking=0.1, passes=PASSES, fp32_matmul="ieee"):
    return [
        OpCase("gated_mlp", s.model, f"d={s.d},I={s.I}", M, s.d, None, s.I, r, q, masking, False, dtype, passes,
               fp32_matmul)
        for s, M, r, q in itertools.product(shapes, tokens, ranks, dropouts)
    ]


LLAMA_32_1B = dict(model="Llama-3.2-1B", layers=16, d=2048, I=8192, heads=32, kv_heads=8, vocab=128256,
                   tie_embeddings=True)


def smoke() -> Preset:
    """Tiny shapes on CPU: exercises every code path (numerics, timing, records, chart) in seconds."""
    tiny_proj = (ProjShape("tiny", "q,o", 128, 128, False), ProjShape("tiny", "k,v", 128, 32, True))
    tiny_mlp = (MLPShape("tiny", 128, 352),)
    ops = _lora_cases(tiny_proj[:1], (128,), (16,), (0.0,), "bfloat16")  # no bias, no dropout
    ops += _lora_cases(tiny_proj[1:], (128,), (16,), (0.05,), "bfloat16")  # bias and Philox dropout
    ops += _mlp_cases(tiny_mlp, (128,), (16,), (0.0, 0.05), "bfloat16")
    ops += _mlp_cases(tiny_mlp, (128,), (16,), (0.05,), "bfloat16", passes=("fwd+bwd",), fp32_matmul="tf32")
    tiny = dict(model="tiny-llama", layers=2, d=64, I=176, heads=4, kv_heads=2, vocab=256)
    train = tuple(TrainCase(**tiny, batch=2, seq=32, checkpointing=c, steps=3, warmup=1) for c in (False, True))
    return Preset("smoke", (*ops, *train), device="cpu", reps=3, warmup=1, check_tokens=128,
                  compile_backend="aot_eager", cpu_threads=1,
                  notes=("smoke: one CPU thread (on shared machines thread contention slows tiny ops 100-fold)",
                         "smoke: tiny CPU shapes; checks the harness, not a performance figure",
                         "smoke: vanilla_compiled uses torch.compile(backend='aot_eager') to stay fast on CPU"))


def gpu() -> Preset:
    """What gpu_run.sh measures in a few minutes on one H100/H200, in priority order.

    1. gated MLP, Llama-3-8B shape, 8192 tokens, r 16, lora_dropout 0 and 0.05, all three passes;
    2. the training step, Llama-3.2-1B shapes (16 layers), 4 x 2048 tokens, with and without checkpointing;
    3. lora_linear, every distinct q/k/v/o shape of both models, 8192 tokens, r 16, lora_dropout 0.05, fwd+bwd;
    4. gated MLP: the other two shapes and the token sweep 2048 / 16384 at r 16, then r 64 (fwd+bwd);
    5. gated MLP, Llama-3-8B, r 16 and 64, with TF32 allowed for fp32 matmuls (fwd+bwd);
    6. lora_linear token and rank sweep on Llama-3-8B q,o (fwd+bwd), then r 64 with TF32 allowed.
    vanilla_compiled runs on groups 1 and 3 only: each new shape is a new compilation.
    The runner stops starting cases at its time budget and records the rest as skipped."""
    bf = "bfloat16"
    llama8, qwen7, llama1 = MLP_SHAPES
    ops = _mlp_cases((llama8,), (8192,), (16,), (0.05, 0.0), bf)
    later = _lora_cases(PROJ_SHAPES, (8192,), (16,), (0.05,), bf, ("fwd+bwd",))
    later += _mlp_cases((qwen7, llama1), (8192,), (16,), (0.05,), bf, passes=("fwd+bwd",))
    later += _mlp_cases((llama8,), (2048, 16384), (16,), (0.05,), bf, passes=("fwd+bwd",))
    later += _mlp_cases((llama8,), (8192,), (64,), (0.05, 0.0), bf, passes=("fwd+bwd",))
    later += _mlp_cases((llama8,), (8192,), (16, 64), (0.05,), bf, passes=("fwd+bwd",), fp32_matmul="tf32")
    later += _lora_cases(PROJ_SHAPES[:1], (2048, 16384), (16,), (0.05,), bf, ("fwd+bwd",))
    later += _lora_cases(PROJ_SHAPES[:1], (8192,), (64,), (0.0, 0.05), bf, ("fwd+bwd",))
    later += _lora_cases(PROJ_SHAPES[:1], (8192,), (64,), (0.05,), bf, ("fwd+bwd",), fp32_matmul="tf32")
    train = tuple(TrainCase(**LLAMA_32_1B, batch=4, seq=2048, checkpointing=c) for c in (False, True))
    first = len(ops) + len(PROJ_SHAPES)  # the main MLP cases and one lora_linear case per shape
    return Preset("gpu", (*ops, *train, *later), device="cuda", reps=30, warmup=5, check_tokens=1024,
                  compiled_cases=first,
                  notes=(f"gpu: vanilla_compiled on the first {first} op cases only (a compile per shape)",
                         "gpu: a priority-ordered subset of the full matrix sized for ~7 minutes; "
                         "see transpeft_kernels/bench/cases.py",))


def full() -> Preset:
    """Every combination the issue lists: all shapes x 2048/8192/16384 tokens x r 16/64 x lora_dropout 0/0.05,
    all three passes, plus both training-step variants (Llama-3.2-1B shapes and 4 layers of Llama-3-8B)."""
    tokens, ranks, dropouts = (2048, 8192, 16384), (16, 64), (0.0, 0.05)
    ops = _mlp_cases(MLP_SHAPES, tokens, ranks, dropouts, "bfloat16")
    ops += _lora_cases(PROJ_SHAPES, tokens, ranks, dropouts, "bfloat16")
    llama8 = dict(model="Llama-3-8B", layers=4, d=4096, I=14336, heads=32, kv_heads=8, vocab=128256)
    train = [TrainCase(**LLAMA_32_1B, batch=4, seq=2048, checkpointing=c) for c in (False, True)]
    train += [TrainCase(**llama8, batch=2, seq=4096, checkpointing=c) for c in (False, True)]
    return Preset("full", (*ops, *train), device="cuda", reps=50, warmup=10, check_tokens=1024)


PRESETS = {"smoke": smoke, "gpu": gpu, "full": full}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]()
