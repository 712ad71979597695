"""Base models: the built-in `micro` network and any Hugging Face causal LM.

`micro` is a small Llama-architecture network built from a config (no download) with a
byte-level tokenizer, so it reads Russian or any UTF-8 text; it is trained from scratch on each
corpus. A Hugging Face model (hub id or local path) is adapted with LoRA, or QLoRA on a 4-bit
nf4 base. This module imports torch: only the worker and the benchmarks import it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from backend.core.errors import ModelError

MICRO = "micro"


class Tokenizer(Protocol):
    """What training and scoring need from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS, EOS and PAD: any language, no vocabulary file."""

    vocab_size = 260  # 256 bytes + bos, eos, pad + one spare, a multiple of 4
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface (no special tokens added)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


@dataclass(frozen=True)
class MicroPreset:
    hidden_size: int  # width of the residual stream
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads (head size = hidden_size / num_heads)
    intermediate_size: int  # SwiGLU width, about 8/3 of hidden_size
    context: int  # longest sequence the network sees

    def params(self) -> int:
        """Parameter count (embeddings tied), to size memory and FLOP forecasts."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        return ByteTokenizer.vocab_size * d + L * (4 * d * d + 3 * d * f + 2 * d) + d


# Sizes chosen for the CPU first: `small` trains at about 18k tokens/s on two cores, enough to
# learn a 10-page corpus (the 1.2M-token floor) in about a minute; `large` is for a GPU.
MICRO_PRESETS: dict[str, MicroPreset] = {
    "tiny": MicroPreset(64, 2, 4, 172, 256),
    "small": MicroPreset(128, 4, 4, 344, 256),
    "base": MicroPreset(256, 6, 8, 688, 512),
    "large": MicroPreset(512, 8, 8, 1376, 1024),
}


def micro_config(preset: str):
    from transformers import LlamaConfig

    if preset not in MICRO_PRESETS:
        raise ModelError(
            f"unknown micro preset {preset!r}; choose one of {', '.join(MICRO_PRESETS)}"
        )
    p = MICRO_PRESETS[preset]
    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        max_position_embeddings=p.context,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        tie_word_embeddings=True,
    )


@dataclass(frozen=True)
class BaseSpec:
    """Which base to load and how: the part of the settings that a warm worker shares."""

    base: str = MICRO  # "micro", a hub id, or a local folder
    preset: str = "small"  # micro only
    quant: str | None = None  # None (LoRA) or "4bit" (QLoRA, nf4)
    trust_remote_code: bool = False  # only on the user's explicit flag
    device: str | None = None  # None: cuda when available, else cpu

    @property
    def is_micro(self) -> bool:
        return self.base == MICRO

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_tensor_cores() -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): what is left
    in fp32 under bf16 (the optimizer's master weights, a 4-bit base's upcast norms) runs on the
    tensor cores at a 10-bit mantissa instead of on the fp32 units. Nothing changes on the CPU."""
    if not torch.cuda.is_available():
        return
    try:  # the API of torch 2.9 and later
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def train_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, fp32 on the CPU (CPU bf16 matmuls are slow and lossy)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


def build_micro(preset: str, seed: int, device: torch.device):
    """A freshly initialised micro network: the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    config = micro_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device)


def _hf_source(base: str) -> str:
    """Where to load an HF base from: a local folder (checked), or a hub id for the cache."""
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{base}: no config.json in this folder; point --base at a saved model")
        return str(path)
    if base.startswith((".", "/", "~")) or os.sep in base.strip("/").replace("/", "", 1):
        raise ModelError(f"{base}: no such folder; check the path given to --base")
    return base


def load_tokenizer(spec: BaseSpec) -> Tokenizer:
    if spec.is_micro:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    where = _hf_source(spec.base)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # hub, file and remote-code errors all end as one line
        raise _hf_error(spec, exc) from None
    return HFTokenizer(tok)


def _hf_error(spec: BaseSpec, exc: Exception) -> ModelError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return ModelError(
            f"{spec.base} needs its own code to load; rerun with --trust-remote-code if you trust it"
        )
    folder = Path(spec.base).expanduser()
    if "safetensors" in text and folder.is_dir() and any(folder.glob("*.bin")):
        return ModelError(
            f"{spec.base} holds its weights as pickles (.bin), which can run code as they load; ltm-tui "
            "reads safetensors only: save the model again with save_pretrained (it writes .safetensors)"
        )
    if isinstance(exc, OSError) or "offline" in text.lower() or "connect" in text.lower():
        return ModelError(
            f"{spec.base} is not available offline ({text[:160]}); download it first "
            f"(huggingface-cli download {spec.base}) or pass a local folder to --base"
        )
    return ModelError(f"{spec.base} could not be loaded: {text[:200]}")


def load_hf_base(spec: BaseSpec, device: torch.device):
    """Load an HF causal LM for LoRA (bf16/fp16 on GPU, fp32 on CPU) or QLoRA (4-bit nf4)."""
    from transformers import AutoModelForCausalLM

    where = _hf_source(spec.base)
    dtype = train_dtype(device)
    # Weights from safetensors only, read straight onto the device: a 13B base never passes
    # through 26 GB of host memory on its way to the card.
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "use_safetensors": True,
                    "device_map": {"": device.index or 0} if device.type == "cuda" else {"": str(device)}}
    if spec.quant == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif spec.quant not in (None, "", "none"):
        raise ModelError(f"unknown --quant {spec.quant!r}; use 4bit for QLoRA or leave it out")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _hf_error(spec, exc) from None
    if spec.quant == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model


def load_base(spec: BaseSpec, seed: int = 0):
    """(model, tokenizer, device) for a spec; for micro, the seed's untrained network."""
    device = pick_device(spec.device)
    tok = load_tokenizer(spec)
    if spec.is_micro:
        if spec.quant:
            raise ModelError("--quant applies to Hugging Face bases, not to micro")
        return build_micro(spec.preset, seed, device), tok, device
    return load_hf_base(spec, device), tok, device


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def attach_lora(base, lora, seed: int, fast_dropout: bool = True):
    """Wrap a base in a fresh LoRA adapter (the estimate's calibration uses the same one).

    `fast_dropout` swaps PEFT's dropout on each adapter's input for `backend.compute.dropout.FastDropout`
    (same rate, a quarter of the random draws on the CPU); False gives plain PEFT, the
    benchmarks' peer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from backend.compute.dropout import use_fast_dropout

    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    model = get_peft_model(base, config)
    if fast_dropout:
        use_fast_dropout(model)
    return model
