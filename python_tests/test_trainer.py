"""HF Trainer (and TRL's SFTTrainer when installed) on a patched PEFT model, on the CPU."""
import pytest
import torch

import transpeft_kernels as tpk
from helpers import batch, lora_model

pytest.importorskip("peft")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.items = [batch(seed=i, shape=(length,)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_with_checkpointing_and_accumulation(tmp_path, precision):
    from transformers import Trainer, TrainingArguments

    model = lora_model("llama", lora_dropout=0.05)
    tpk.patch(model, masking=0.1, dropping=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=precision == "bf16", use_cpu=True, learning_rate=1e-2, logging_steps=1, report_to=[],
        save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert tpk.is_patched(model)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".mlp." in n for n in changed), "FFN adapters did not train"


def test_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer on a text dataset (tokenized by TRL with a local tokenizer), gradient checkpointing
    on: the patched MLPs mask the intermediate (exact zeros at the masking rate reach down_proj), skip some
    FFNs, and the FFN adapters train."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_workflow import NUMBERS, WORDS, _tokenizer

    model = lora_model("llama")
    report = tpk.patch(model, masking=0.1, dropping=0.3)
    assert report.mlps_patched == 2
    words = NUMBERS + WORDS
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=gen)) for _ in range(8)]
    data = datasets.Dataset.from_dict({"text": texts})
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, use_cpu=True,
                        report_to=[], save_strategy="no", gradient_checkpointing=True, learning_rate=1e-2,
                        max_length=32, seed=0)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mlp_calls, zero_fractions = [], []
    for layer in model.get_base_model().model.layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(1) if m.training else None)
        # the input of down_proj is the masked activation (the hook makes down_proj run its own forward)
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: zero_fractions.append((a[0] == 0).float().mean().item()) if m.training else None)
    # a local tokenizer: without one SFTTrainer would fetch the model's from the hub
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=_tokenizer())
    assert trainer.model is model and tpk.is_patched(model)  # no PEFT re-wrapping: the patch stays in place
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert tpk.is_patched(model)
    assert 0 < len(zero_fractions) < len(mlp_calls), "dropping skipped no FFN"
    assert 0.05 < sum(zero_fractions) / len(zero_fractions) < 0.15, zero_fractions  # masking 0.1
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".mlp." in n for n in changed), "FFN adapters did not train"
