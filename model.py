"""
The frozen base model of QLoRA: load a causal LM, quantize its linear layers to 4 bits, freeze it.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) fine-tunes small adapters on top of a base model whose
weights are stored in 4 bits and never updated:
- NF4 (section 3, "4-bit NormalFloat"): each block of 64 weights is scaled by its absmax and rounded to
  one of 16 levels placed at quantiles of N(0, 1), which suits normally distributed weights better
  than the evenly spaced levels of FP4 (kept here as the "fp4" option for comparison).
- Double quantization (section 3): the per-block absmax constants (fp32, 0.5 bit per weight) are
  themselves quantized to 8 bits in blocks of 256, bringing their cost down to ~0.127 bit per weight.
- Compute dtype: storage is 4-bit but matmuls are not; each forward dequantizes a layer's weight to
  the compute dtype (bf16 on recent hardware) and does y = x @ dequant(W).T, so activations, LoRA
  adapters and gradients all live in the compute dtype.
Only the decoder's nn.Linear layers are quantized; embeddings, lm_head and norms stay in compute_dtype.

This file also builds the embedded default model: a tiny random Qwen2 with its own byte-level BPE
tokenizer, saved as an ordinary Hugging Face model directory and loaded by exactly the same code path
as a real one.

Imports: torch, the standard library, transformers, tokenizers; bitsandbytes lazily where 4-bit is used.
"""

import importlib.util
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Config
    from transformers.generation import BaseStreamer

QUANTIZATIONS = ("nf4", "fp4", "none")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTIONS = ("auto", "flash_attention_2", "sdpa", "eager")


class ModelError(ValueError):
    """A bad model setting or path, with a one-line message that names the setting."""


# -----------------------------------------------------------------------------
# device, dtype, attention


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda > mps > cpu; an explicit name ('cpu', 'cuda', 'cuda:1', 'mps') is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelError(f"device: {name!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device: {name!r} was asked for but torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device: {name!r} does not exist (this machine has {torch.cuda.device_count()} GPUs)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device: {name!r} was asked for but torch.backends.mps.is_available() is False")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device: {name!r} is not supported (expected auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_has_bf16() -> bool:
    """True if the CPU has native bf16 arithmetic (x86 AVX512_BF16 or AMX-BF16).

    torch.backends.cpu.get_cpu_capability() is no help here: it says 'AVX512' with or without the bf16
    extension. We ask torch's own cpuinfo probe (a private helper, hence the getattr), and fall back to
    the Linux /proc/cpuinfo flags where that helper is missing. Anything else (ARM, macOS) -> False.
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(probe() or amx())
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> the fastest training dtype on `device`; 'bfloat16' | 'float16' | 'float32' are honoured."""
    if name != "auto":
        if name not in DTYPES:
            raise ModelError(f"dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        # bf16 has fp32's exponent range, so no loss scaling is needed; pre-Ampere GPUs only have fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        # bf16 on MPS needs macOS 14+; try a tiny tensor rather than parse OS versions
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device) + 1
            return torch.bfloat16
        except (RuntimeError, TypeError):
            return torch.float16
    # on a CPU without native bf16, bf16 is emulated and slower than fp32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision: matmuls in the compute dtype (bf16/fp16), adapter weights and optimizer in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def resolve_attention(name: str, device: torch.device | str, model_class: type | None = None) -> str:
    """'auto' -> the first that the device and the model class support: flash_attention_2 (flash_attn
    installed, CUDA) > sdpa > eager. Gemma 2, for one, supports no sdpa (its attention soft-caps scores).

    model_class is the transformers class that will be loaded (model_class_of); None = assume it supports
    everything. An explicit choice the class does not support is refused here, in one line.
    """
    if name not in ATTENTIONS:
        raise ModelError(f"attention: {name!r} is not one of {', '.join(ATTENTIONS)}")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    is_cuda = torch.device(device).type == "cuda"
    available = {
        "flash_attention_2": has_flash and is_cuda,
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "eager": True,
    }
    supported = {  # class flags; transformers < 4.5x spelled the first _supports_flash_attn_2
        "flash_attention_2": getattr(
            model_class, "_supports_flash_attn", getattr(model_class, "_supports_flash_attn_2", True)
        ),
        "sdpa": getattr(model_class, "_supports_sdpa", True),
        "eager": True,
    }
    if name == "flash_attention_2" and not available[name]:
        raise ModelError("attention: flash_attention_2 needs a CUDA device and the flash_attn package")
    if name != "auto":
        if not supported[name]:
            raise ModelError(f"attention: {model_class.__name__} does not support {name}; use auto or eager")
        return name
    return next(n for n in ("flash_attention_2", "sdpa", "eager") if available[n] and supported[n])


def model_class_of(name_or_path: str) -> type | None:
    """The transformers class AutoModelForCausalLM would load for a model (from its config.json), or None
    when transformers has no such mapping (remote code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = from_pretrained(AutoConfig, name_or_path)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


# -----------------------------------------------------------------------------
# the embedded tiny model

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as the trainer adds them first

# Qwen2.5's ChatML template minus its default system message and tool calling
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer (as GPT-2 / Qwen use) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # byte-level: every string maps to bytes first, so there is never an unknown token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # as Qwen2.5-Instruct: a chat turn ends generation
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer: "PreTrainedTokenizerBase") -> "Qwen2Config":
    """~3.7M parameters: big enough to have every part of a real Qwen2, small enough to train on a CPU.

    The output head is untied from the embeddings (as in Qwen2.5-7B) and drawn with a larger std, see
    build_tiny: with LoRA only, lm_head and the final norm stay frozen, so the head's scale bounds how
    confident the model can ever be. At the usual std 0.02 the largest logit is |h| |w| = 16 * 0.32 ~ 5
    against ~900 others, which caps p(answer) near 15% however well the adapters learn.
    """
    from transformers import Qwen2Config

    pad, eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Qwen2
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=pad,  # Qwen's convention: no BOS is prepended, bos id = <|endoftext|>
        eos_token_id=eos,
        pad_token_id=pad,
    )


def is_complete_build(path: str) -> bool:
    """True if `path` holds every file of a finished build (TINY_FILES)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in TINY_FILES)


def build_tiny(out_dir: str, texts: Iterable[str], seed: int = 0) -> str:
    """Build the tiny default model into `out_dir` once and return its path.

    The build is written to a temporary directory next to `out_dir` and renamed into place, so an
    interrupted build never leaves a half-written model behind. Same texts and seed -> same bytes.
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out_dir = os.path.abspath(out_dir)
    if is_complete_build(out_dir):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ModelError(f"{out_dir} exists but is not a complete model build (delete it to rebuild)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ModelError("build_tiny: no texts to train the tokenizer on")

    tokenizer = train_tokenizer(texts)
    config = tiny_config(tokenizer)
    # The random init is the model, so it must be reproducible; fork_rng keeps the caller's random state
    # as it was, so a run that builds the model trains exactly like one that finds it cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # |w| ~ 1.6: logits up to ~25 (see tiny_config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model directory is not
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # atomic on POSIX; replaces an empty out_dir too
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete_build(out_dir):  # another process may have won the race to build it
            raise
    return out_dir


# -----------------------------------------------------------------------------
# loading and quantizing


def quantize_4bit(
    module: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    skip: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """Replace every nn.Linear under `module` (except those named in `skip`) by a bitsandbytes Linear4bit.

    gpt-fast style: walk named_children and setattr. Moving a Linear4bit to a device is what quantizes
    it (bitsandbytes' Params4bit.to), so each layer lands on `device` already in 4 bits and a GPU never
    holds the whole model in 16 bits. compress_statistics=True is double quantization.
    """
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if name in skip or isinstance(child, bnb.nn.Linear4bit):
            continue
        if not isinstance(child, nn.Linear):
            quantize_4bit(child, quant_type, compute_dtype, device, skip)
            continue
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=quant_type,
            device="meta",
        )  # meta: don't allocate a weight we are about to replace
        q.weight = bnb.nn.Params4bit(
            child.weight.data, requires_grad=False, compress_statistics=True, quant_type=quant_type, module=q
        )
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
        q.support_avx512bf16_for_cpu = False  # keep the layout that trains: see lora.keep_standard_layout
        setattr(module, name, q.to(device))
    return module


def bnb_4bit_works(device: torch.device | str) -> bool:
    """Can bitsandbytes quantize and run a 4-bit layer on `device`? (MPS support is partial.)"""
    try:
        layer = quantize_4bit(nn.Sequential(nn.Linear(64, 64)), "nf4", torch.float32, device)
        layer(torch.zeros(1, 64, device=device))
        return True
    except Exception:  # any failure inside bitsandbytes means "no", whatever its type
        return False


def check_name_or_path(name_or_path: str) -> None:
    """Fail early, in one line, on a local path that is not a model directory or a GGUF file."""
    # a hub id is 'org/name' (or a bare 'name'); anything else that looks like a path is a path
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if name_or_path.endswith(".gguf"):
        check_gguf(name_or_path)
    elif os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ModelError(f"model.name_or_path: {name_or_path!r} has no config.json (not a Hugging Face model)")
    elif looks_local or os.path.exists(name_or_path):
        what = "is not a directory" if os.path.exists(name_or_path) else "does not exist"
        raise ModelError(
            f"model.name_or_path: {name_or_path!r} {what} (expected a local model directory, a .gguf file "
            "or a Hugging Face hub id such as Qwen/Qwen2.5-7B-Instruct)"
        )


def check_gguf(path: str) -> None:
    """A .gguf base: the file exists, starts with GGUF's magic bytes, and the gguf package is installed."""
    if not os.path.isfile(path):
        raise ModelError(f"model.name_or_path: {path!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"model.name_or_path: {path!r} is not a GGUF file (no GGUF header)")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("model.name_or_path: a .gguf base needs the gguf package: pip install gguf")


def gguf_split(name_or_path: str) -> tuple[str, dict[str, str]]:
    """(what from_pretrained opens, its extra arguments): transformers opens a GGUF file as a directory plus
    gguf_file=the file's name; it dequantizes the weights and builds the tokenizer and chat template from
    the file's metadata."""
    if name_or_path.endswith(".gguf"):
        path = os.path.abspath(name_or_path)
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return name_or_path, {}


def from_pretrained(auto_class: type, name_or_path: str, **kwargs: Any) -> Any:
    """auto_class.from_pretrained, cache first for hub ids, with 'not found' (or an unreadable GGUF file)
    turned into a ModelError."""
    where, gguf = gguf_split(name_or_path)
    if gguf:
        try:
            return auto_class.from_pretrained(where, **gguf, **kwargs)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, struct.error) as e:  # corrupt
            raise ModelError(f"model.name_or_path: cannot read GGUF file {name_or_path!r}: {_first_line(e)}") from None
    if not os.path.isdir(name_or_path):
        # a cached hub model must load without the network: offline, the hub client retries with backoff
        try:
            return auto_class.from_pretrained(name_or_path, local_files_only=True, **kwargs)
        except OSError:
            pass
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # not in the HF cache and no network, unknown or gated repo, missing files, ...
        raise ModelError(f"model.name_or_path: cannot load {name_or_path!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_tokenizer(name_or_path: str) -> "PreTrainedTokenizerBase":
    """The tokenizer of `name_or_path`, with a pad token (eos if it has none) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; it is masked out of the loss anyway
    tokenizer.padding_side = "right"  # training pads on the right; generation code may flip it to left
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    quantization: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    attention: str = "auto",
    gradient_checkpointing: bool = True,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer as a frozen (optionally 4-bit) base for LoRA / DoRA.

    Works the same for a local model directory (build_tiny's output included) and a hub id. Returns
    (model, tokenizer) with the model in eval mode and every parameter frozen.

    Why not transformers' BitsAndBytesConfig: its 4-bit path (and any device_map) requires accelerate,
    which we don't want at runtime. So we load in compute_dtype and quantize ourselves (quantize_4bit).
    Raises ModelError for a bad quantization, attention or device, or a model that cannot be found.
    """
    from transformers import AutoModelForCausalLM

    if quantization not in QUANTIZATIONS:
        raise ModelError(f"model.quantization: {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    device = resolve_device("auto") if device is None else resolve_device(str(device))
    resolve_attention(attention, device)  # a bad name or an unusable flash_attention_2: refused before any loading
    name_or_path = os.path.expanduser(str(name_or_path))
    check_name_or_path(name_or_path)
    attention = resolve_attention(attention, device, model_class_of(name_or_path))
    if quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(
                f"model.quantization: {quantization} needs bitsandbytes>=0.48 (pip install bitsandbytes) "
                "or set it to none"
            )
        if device.type not in ("cpu", "cuda") and not bnb_4bit_works(device):
            warnings.warn(
                f"bitsandbytes cannot run 4-bit layers on {device.type}; loading without quantization", stacklevel=2
            )
            quantization = "none"

    tokenizer = load_tokenizer(name_or_path)
    # no device_map (it needs accelerate): the model loads on the CPU and moves below
    model = from_pretrained(AutoModelForCausalLM, name_or_path, dtype=compute_dtype, attn_implementation=attention)
    if name_or_path.endswith(".gguf"):  # dequantized on load: plain nn.Linear weights, saved as an ordinary model
        model.hf_quantizer, model.is_quantized = None, False
        vars(model.config).pop("quantization_config", None)
    if quantization != "none":
        quantize_4bit(model, quantization, compute_dtype, device)
    model.to(device)  # moves what is left (embeddings, norms, lm_head); the 4-bit layers are already there
    model.requires_grad_(False)  # the base is frozen: only adapters added later will train
    if gradient_checkpointing:
        # recompute each decoder layer's activations in backward instead of storing them. Non-reentrant:
        # the reentrant variant drops gradients of adapters inside a layer whose input needs no grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
    return model.eval(), tokenizer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as the number of weights it stores."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@torch.no_grad()
def generate(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: "BaseStreamer | None" = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) and return the new token ids of each, stop token cut.

    The batch is left-padded so that every prompt ends at the same position and generation starts
    together. temperature 0 is greedy decoding; otherwise nucleus sampling with top_p. `streamer` is a
    transformers streamer (e.g. TextStreamer) that prints tokens as they come, for a batch of one.
    """
    stop = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    stop |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    stop.discard(None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    was_training = model.training
    model.eval()  # no dropout; gradient checkpointing is off in eval mode, so the KV cache works
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop),
        pad_token_id=pad,
        use_cache=True,
        streamer=streamer,
        **sampling,
    )
    model.train(was_training)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        results.append(row[:cut])
    return results
