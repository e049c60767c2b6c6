"""The training-step benchmark: a decoder stack with random weights, LoRA on all linear layers.

One model per case (built from a LlamaConfig, in the case dtype, LoRA r on every linear layer with
random lora_B). Implementations, on that same model in turn:
    vanilla        each decoder MLP runs baselines.vanilla_masked_mlp (the reference code's float mask)
                   behind reference-style dropping (one torch.rand per MLP and forward; below p the FFN
                   returns zeros)
    torch, triton, cuda   transpeft_kernels.patch(model, masking, dropping, backend=...)
A step is forward, backward, AdamW step and zero_grad on the adapter parameters. Reported: median step
time over warm steps, tokens/s (tokens per step / median step time), peak memory over the timed steps
(absolute, and above what was allocated when they started: weights, optimizer state, batches),
and the bytes one forward saves for backward (dropping makes this vary with which layers were skipped;
it is measured after the same torch.manual_seed for every implementation).

Numerics first: with masking, dropping and LoRA dropout off, the patched and vanilla models must give
the same loss and adapter gradients (normwise relative error; train-step tolerance below).
"""
from __future__ import annotations

import contextlib
import gc
import traceback
import types

import torch
from torch import nn

from ..baselines import vanilla_masked_mlp
from ..integration import patch, unpatch
from ..memory import saved_activation_bytes
from .cases import TrainCase
from .impls import BACKEND_IMPLS, availability, dtype_of
from .numerics import NumericsMismatch, rel_err
from .records import add_speedups, make_record
from .timing import synchronize, time_calls

TRAIN_IMPLS = ("vanilla", *BACKEND_IMPLS)
# Loss and all adapter gradients of a whole stack, by dtype: more roundings in a chain than one op.
TRAIN_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
N_BATCHES = 4


def build_model(case: TrainCase, device: torch.device, seed: int = 0):
    """A PEFT model (LoRA r on all linear layers, random non-zero B) over a random decoder of the case's shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.d, intermediate_size=case.I, num_hidden_layers=case.layers,
        num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, max_position_embeddings=max(case.seq, 128),
        tie_word_embeddings=case.tie_embeddings, use_cache=False, hidden_act="silu",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype_of(case.dtype))
    lora = LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.lora_dropout, target_modules="all-linear",
                      init_lora_weights=False)  # random B: the adapter gradients are not trivially zero
    model = get_peft_model(model, lora)
    model.train()
    return model


def _mlps(model) -> list[nn.Module]:
    return [layer.mlp for layer in model.get_base_model().model.layers]


def install_vanilla(model, masking: float, dropping: float) -> None:
    """Reference-style masking and dropping on every decoder MLP (instance forwards; remove_vanilla undoes)."""
    for mlp in _mlps(model):
        def forward(self, x, _p=masking, _pc=dropping):
            if not self.training:
                return type(self).forward(self, x)
            if _pc > 0 and float(torch.rand(())) < _pc:
                return torch.zeros_like(x)
            if _p > 0:
                return vanilla_masked_mlp(self, x, _p)
            return type(self).forward(self, x)

        mlp.forward = types.MethodType(forward, mlp)


def remove_vanilla(model) -> None:
    for mlp in _mlps(model):
        mlp.__dict__.pop("forward", None)


@contextlib.contextmanager
def _lora_dropout_off(model):
    drops = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default") and isinstance(m, nn.Dropout)]
    saved = [d.p for d in drops]
    try:
        for d in drops:
            d.p = 0.0
        yield
    finally:
        for d, p in zip(drops, saved):
            d.p = p


def _use(model, impl: str, masking: float, dropping: float) -> None:
    remove_vanilla(model)
    unpatch(model)
    if impl == "vanilla":
        install_vanilla(model, masking, dropping)
    else:
        patch(model, masking=masking, dropping=dropping, backend=impl)


def _loss_and_grads(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.cat([g.flatten().float() for g in grads])


def check_train(model, case: TrainCase, impl: str, ids) -> float:
    """Relative error of impl's loss and adapter gradients against vanilla, interventions off."""
    with _lora_dropout_off(model):
        _use(model, "vanilla", 0.0, 0.0)
        loss_v, grads_v = _loss_and_grads(model, ids)
        _use(model, impl, 0.0, 0.0)
        loss_i, grads_i = _loss_and_grads(model, ids)
    err = max(rel_err(loss_i, loss_v), rel_err(grads_i, grads_v))
    tol = TRAIN_TOLERANCE[dtype_of(case.dtype)]
    if not err <= tol:
        raise NumericsMismatch(f"{impl} on {case.key}: loss/adapter-gradient relative error {err:.3g} against vanilla "
                               f"above {tol:g} (masking, dropping and lora dropout off)")
    return err


def run_train_case(case: TrainCase, impl_names, device: torch.device, preset, env: dict, log=print) -> list[dict]:
    """Records (one per implementation, pass "fwd+bwd" = a whole optimizer step) of one training case."""
    model = build_model(case, device)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(device) for _ in range(N_BATCHES)]
    fields = dict(op="train_step", model=case.model, label=f"L={case.layers}", M=case.M, d=case.d, I=case.I, r=case.r,
                  masking=case.masking, dropping=case.dropping, lora_dropout=case.lora_dropout, dtype=case.dtype,
                  checkpointing=case.checkpointing, layers=case.layers, batch=case.batch, seq=case.seq)
    fields["pass"] = "fwd+bwd"
    records = []

    def step(i):
        loss = model(input_ids=batches[i], labels=batches[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for impl in [n for n in impl_names if n in TRAIN_IMPLS]:
        reason = None if impl == "vanilla" else availability(impl, device)
        if reason is not None:
            records.append(make_record(env, preset.name, **fields, impl=impl, status="skipped", reason=reason))
            continue
        try:
            err = None if impl == "vanilla" else check_train(model, case, impl, batches[0][:1])
            _use(model, impl, case.masking, case.dropping)
            torch.manual_seed(0)
            saved = saved_activation_bytes(lambda: model(input_ids=batches[0], labels=batches[0]).loss, exclude=params)
            for i in range(case.warmup):
                step(i % N_BATCHES)
            synchronize(device)
            before = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            timing = time_calls(step, device, warmup=0, reps=case.steps, buffers=N_BATCHES)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            med = timing.median_ms
            records.append(make_record(
                env, preset.name, **fields, impl=impl, status="ok", median_ms=round(med, 4), iqr_ms=round(timing.iqr_ms, 4),
                reps=len(timing.times_ms), timer=timing.method, tokens_per_s=round(case.M / (med / 1e3), 1),
                peak_mem_bytes=None if peak is None else int(peak),
                peak_extra_bytes=None if peak is None else int(peak - before), saved_bytes=saved, numerics_rel_err=err,
                numerics_mode="vanilla: reference" if err is None else "interventions off, against vanilla"))
        except NumericsMismatch as e:
            log(f"!!! NUMERICS MISMATCH: {e}")
            records.append(make_record(env, preset.name, **fields, impl=impl, status="numerics_mismatch", reason=str(e)))
        except Exception as e:
            log(f"!!! {impl} failed on {case.key}: {type(e).__name__}: {e}")
            log(traceback.format_exc(limit=6))
            records.append(make_record(env, preset.name, **fields, impl=impl, status="error",
                                       reason=f"{type(e).__name__}: {e}"[:500]))
        finally:
            opt.zero_grad(set_to_none=True)
    remove_vanilla(model)
    unpatch(model)
    add_speedups(records)
    del model, opt, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records
