"""Base models: the built-in `micro` network and any Hugging Face causal LM.

`micro` is a small Llama-architecture network built from a config (no download) with a
byte-level tokenizer, so it reads Russian or any UTF-8 text; it is trained from scratch on each
corpus. A Hugging Face model (hub id or local path) is adapted with LoRA, or QLoRA on a 4-bit
nf4 base. This module imports torch: only the worker and the benchmarks import it.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from backend.core.config import ATTENTION, KERNELS, PRECISIONS
from backend.core.devices import SLOT_ENV
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
    # auto: bf16 mixed precision on a CUDA card (fp16 on one without bf16), fp32 on the CPU;
    # bf16: mixed precision on the CPU too (slower there; the tests use it to check the GPU path)
    precision: str = "auto"
    # auto: flash_attention_2 when the flash-attn package is installed and the run is on CUDA,
    # else PyTorch's SDPA; or one of ATTENTION by name
    attn: str = "auto"
    kernels: str | None = None  # "liger": fused norm, RoPE, SwiGLU and linear cross-entropy (CUDA)
    compile: bool = False  # torch.compile each decoder layer (regional: minutes, not tens of them)

    @property
    def is_micro(self) -> bool:
        return self.base == MICRO

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(requested: str | None = None) -> torch.device:
    """The device asked for, or cuda where there is one. In a worker the service started in a
    slot (`LTM_WORKER_SLOT`), or in a Ray actor, the process sees its one card only, as cuda:0:
    the service already put a run asked for cuda:N on card N, and Ray chose the actor's."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index and os.environ.get(SLOT_ENV):
            return torch.device("cuda", 0)
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_lost(device: torch.device) -> bool:
    """Whether the device can run nothing more in this process: after a sticky CUDA error (an
    illegal memory access, a device-side assert, a lost or faulty card) every later CUDA call
    fails the same way, and only a fresh process gets a new context. A tiny computation read
    back tells; the CPU is never lost."""
    if device.type != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1).item()
        return False
    except torch.OutOfMemoryError:  # the card is full (a job's tensors not freed yet), not lost
        return False
    except Exception:  # the sticky error again, or any other failure of the device
        return True


def use_tensor_cores() -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): what is left
    in fp32 under bf16 (the adapter's and the optimizer's fp32 weights) runs on the
    tensor cores at a 10-bit mantissa instead of on the fp32 units. Nothing changes on the CPU."""
    if torch.cuda.is_available():
        _tf32_on()


def _tf32_on() -> None:
    """Through the flags every torch since 1.12 reads. Torch 2.9's per-backend
    `fp32_precision = "tf32"` would do the same, but once it is set, reading the old flags
    (`torch.backends.cuda.matmul.allow_tf32`, `torch.get_float32_matmul_precision()`, which
    torch's own compiler and other libraries still read) raises a RuntimeError about mixing the
    two APIs. The old flags set the new ones too, for CUDA alone: the CPU's matmuls stay fp32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def check_spec(spec: "BaseSpec") -> None:
    """One line for a precision, attention or kernel name this code does not know."""
    for value, known, flag in ((spec.precision, PRECISIONS, "--precision"), (spec.attn, ATTENTION, "--attn")):
        if value not in known:
            raise ModelError(f"unknown {flag} {value!r}; use one of {', '.join(known)}")
    if spec.kernels not in (None, "", "none", *KERNELS):
        raise ModelError(f"unknown --kernels {spec.kernels!r}; use liger or leave it out")


def train_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of the forward pass: bf16 on a GPU that has it (fp16 on one that does not),
    fp32 on the CPU, where bf16 matmuls are slow and lossy unless asked for."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


def autocast(device: torch.device, precision: str = "auto"):
    """The forward pass's mixed precision: every matmul, attention and activation in bf16 while
    trainable weights (the adapter, or a micro network) and the optimizer stay in fp32. A no-op
    where the dtype is fp32 (the CPU by default)."""
    import contextlib

    dtype = train_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def attention_for(spec: "BaseSpec", device: torch.device) -> str:
    """The attention kernel: the user's choice, else flash-attn 2 where it runs (installed, on
    CUDA, half precision; packed documents go through its varlen path), else SDPA."""
    if spec.attn != "auto":
        if spec.attn == "flash_attention_2" and not _flash_attn_usable(device):
            error = _flash_attn_error()
            broken = f" (it is installed but does not load: {error})" if error not in (None, NO_FLASH_ATTN) else ""
            raise ModelError("--attn flash_attention_2 needs a CUDA card and the flash-attn package "
                             f"(pip install -e '.[gpu]'){broken}; use --attn sdpa")
        return spec.attn
    # not for micro: its weights stay fp32, and scoring runs outside autocast, where flash-attn
    # refuses fp32 (training alone, under autocast, would run)
    if _flash_attn_usable(device) and not spec.is_micro and train_dtype(device, spec.precision) != torch.float32:
        return "flash_attention_2"
    return "sdpa"


def _flash_attn_usable(device: torch.device) -> bool:
    return device.type == "cuda" and _flash_attn_error() is None


NO_FLASH_ATTN = "not installed"


@functools.lru_cache(maxsize=1)
def _flash_attn_error() -> str | None:
    """Why flash-attn cannot run here (not installed, or a wheel built for another torch or CUDA,
    which is found but fails to load with "undefined symbol"), or None. Imported, not just found:
    transformers loads its kernels only at the first forward pass, and every job would fail
    there instead of running on SDPA."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return NO_FLASH_ATTN
    try:
        importlib.import_module("flash_attn").flash_attn_varlen_func  # the kernel the packed path calls
    except Exception as exc:  # noqa: BLE001 - an ImportError, an OSError from the .so: any is "no"
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return None


def build_micro(preset: str, seed: int, device: torch.device, attn: str = "sdpa"):
    """A freshly initialised micro network: the same seed gives the same weights. Its weights
    stay fp32 on every device (it trains from scratch: they are the master weights); on a GPU
    the forward pass runs under bf16 autocast (`autocast`)."""
    from transformers import LlamaForCausalLM

    config = micro_config(preset)
    config._attn_implementation = attn
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


def pickled_weights(where: str, error: str) -> str | None:
    """The one line for a model folder that holds its weights only as pickles (.bin), given the
    error a safetensors-only load gave; None for any other error."""
    folder = Path(where).expanduser()
    if "safetensors" in error and folder.is_dir() and any(folder.glob("*.bin")):
        return (f"{where} holds its weights as pickles (.bin), which can run code as they load; ltm-tui "
                "reads safetensors only: save the model again with save_pretrained (it writes .safetensors)")
    return None


def _hf_error(spec: BaseSpec, exc: Exception) -> ModelError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return ModelError(
            f"{spec.base} needs its own code to load; rerun with --trust-remote-code if you trust it"
        )
    if (line := pickled_weights(spec.base, text)) is not None:
        return ModelError(line)
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
    dtype = train_dtype(device, spec.precision)
    # Weights from safetensors only, read straight onto the device: a 13B base never passes
    # through 26 GB of host memory on its way to the card.
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "use_safetensors": True,
                    "device_map": {"": device.index or 0} if device.type == "cuda" else {"": str(device)},
                    "attn_implementation": attention_for(spec, device)}
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
        # Frozen, as PEFT's prepare_model_for_kbit_training leaves it, but without its upcast:
        # a 4-bit base keeps its norms, embeddings and output layer in the load dtype (bf16 on
        # a card). Upcast to fp32 they would make the whole residual stream, RoPE and the logits
        # fp32; under bf16 autocast the adapter's fp32 weights still get fp32 gradients and
        # AdamW state, which is all the stability it needs.
        for p in model.parameters():
            p.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_base(spec: BaseSpec, seed: int = 0):
    """(model, tokenizer, device) for a spec; for micro, the seed's untrained network."""
    check_spec(spec)
    device = pick_device(spec.device)
    tok = load_tokenizer(spec)
    if spec.is_micro:
        if spec.quant:
            raise ModelError("--quant applies to Hugging Face bases, not to micro")
        return build_micro(spec.preset, seed, device, attention_for(spec, device)), tok, device
    return load_hf_base(spec, device), tok, device


def use_kernels(model, spec: BaseSpec, device: torch.device) -> str:
    """Swap in fused kernels when asked (`--kernels liger`): RMSNorm, RoPE and SwiGLU as single
    Triton kernels, and a linear cross-entropy that never holds the full logits (128k-vocabulary
    logits of a 4×2048 batch are 4 GB in fp32). Returns what happened, in one line for the log;
    where the kernels cannot run (not installed, not on CUDA) the run goes on without them."""
    if spec.kernels in (None, "", "none"):
        return "kernels: PyTorch's own"
    if device.type != "cuda":
        return f"kernels: --kernels {spec.kernels} runs on CUDA only; PyTorch's own on {device}"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        return f"kernels: liger-kernel is not importable ({exc}); pip install -e '.[gpu]'. PyTorch's own"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # liger would return without a word
        return f"kernels: liger has no kernels for model type {model_type!r}. PyTorch's own"
    _apply_liger_kernel_to_instance(model=model)
    model.ltm_kernels = "liger"  # the memory plan reads it (memory_fit.plan_settings): liger keeps less
    return "kernels: liger (fused RMSNorm, RoPE, SwiGLU, linear cross-entropy)"


def compile_layers(model, backend: str | None = None) -> int:
    """Regional compilation: each decoder layer compiled on its own. The layers share their
    code, so the compiler traces one and reuses it for the rest (seconds, not the minutes a
    whole-model compile takes). Returns how many layers were compiled. `LTM_COMPILE_BACKEND`
    picks the backend (the tests use aot_eager: the same graph capture, no C++ toolchain).

    Shapes are automatic-dynamic: the first graph is specialised, and a size that changes (the
    last, shorter batch; with flash-attn's varlen packing, the document boundaries and the
    longest document, which change every step) makes one dynamic graph that serves the rest.
    Static graphs would recompile each step until torch's recompile limit (8), and then run
    eager for good, silently. A job's compiled state starts afresh (`torch.compiler.reset`): a
    warm worker's next job attaches new adapter modules, whose guards would otherwise count
    against that limit job after job."""
    backend = backend or os.environ.get("LTM_COMPILE_BACKEND") or "inductor"
    layers = _decoder_layers(model)
    torch.compiler.reset()
    torch.compiler.set_stance("default")  # `eager_after_training` set it aside after the last job
    for layer in layers:
        layer.compile(backend=backend, dynamic=None)
    return len(layers)


def eager_after_training() -> None:
    """Compiled layers run eager from here on (evaluation, probes): their shapes (each battery's
    lengths, a decoding cache that grows every token) would compile graph after graph for
    forward passes that each run once. `compile_layers` turns the compiled path back on."""
    torch.compiler.set_stance("force_eager")


def _decoder_layers(model) -> list:
    """The repeated blocks of an HF causal LM, under a PEFT wrapper or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        node = inner
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    raise ModelError(f"--compile: no decoder layers found in {type(inner).__name__}")


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def count_params(model, trainable_only: bool = False) -> int:
    """Weights as the model has them: a 4-bit weight by its own shape (bitsandbytes packs two
    values in each byte of the tensor it holds, whose numel is half the count)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            state = getattr(p, "quant_state", None)
            total += state.shape.numel() if getattr(state, "shape", None) is not None else p.numel()
    return total


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
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` alias (a FutureWarning
        # in every job's log that the user cannot act on)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(base, config)
    if fast_dropout:
        use_fast_dropout(model)
    return model
