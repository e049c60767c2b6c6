"""Model builders and training-step helpers shared by the integration tests."""
import copy

import torch

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


def assert_same_training_step(a, b, ids, seed=None, atol=1e-5, rtol=1e-5):
    la, ga = loss_and_grads(a, ids, seed)
    lb, gb = loss_and_grads(b, ids, seed)
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return la, ga


def twin(model):
    return copy.deepcopy(model)


def mlps(model):
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [layer.mlp for layer in hf.model.layers]
