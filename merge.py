"""Fold adapters into the base weights and save one ordinary model directory.

    python merge.py config.yaml [section.key=value ...] --adapter DIR [--adapter DIR2 --weights W1 W2]
                    --out DIR [--dtype bfloat16|float16|float32] [--from-original]

The result (model.safetensors, config.json, generation_config.json, the tokenizer) opens in transformers,
vLLM or a GGUF converter with no project code. Each linear layer becomes

    W' = W + sum_i w_i s_i B_i A_i                         LoRA (w_i from --weights, default 1)
    W' = m / ||W + s B A||_row * (W + s B A)               DoRA

computed in fp32 by lora.merge and stored in --dtype (default: the compute dtype).

Which W? The adapter was trained against the 4-bit base, i.e. against dequant(NF4(W)), not W. By default
W is that dequantized NF4 weight: the merged model computes exactly what was trained, but keeps the
quantization error (a 16-bit model with 4-bit weight fidelity). --from-original loads the original
checkpoint unquantized and adds the same adapter to the exact W: full-precision base weights plus an
adapter that learned to correct slightly different ones. Usually as good, sometimes a little worse:
compare both on your eval set (python infer.py ... --input, on each merged model).

Afterwards the saved directory is reloaded with plain transformers and the largest logit difference to
base + adapters (in memory, unmerged) over a few prompts is printed.
"""

import argparse
import gc
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

import config as C
import data as D
import lora
import model as M

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECK_PROMPTS = (
    "What is the opposite of hot?",
    "Translate into our language: cat",
    "Write one sentence about the sea.",
)


@torch.no_grad()
def dequantize_rest(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every remaining 4-bit layer (one that no adapter wrapped, so lora.merge left it) by an
    nn.Linear holding its dequantized weight in `dtype`. gpt-fast style: named_children and setattr."""
    for name, child in module.named_children():
        if not hasattr(getattr(child, "weight", None), "quant_state"):  # bitsandbytes Params4bit has one
            dequantize_rest(child, dtype)
            continue
        lora.keep_standard_layout(child)  # undo bitsandbytes' CPU inference repacking, if it happened
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        linear.weight = nn.Parameter(lora.dense_weight(child).to(dtype), requires_grad=False)
        if child.bias is not None:
            linear.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
        setattr(module, name, linear)
    return module


def check_out(out: str) -> str:
    """Refuse an --out that holds anything already, or where nothing can be written; before the slow part."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(
            f"--out {out} already exists and is not empty (a model?); choose another directory or delete it"
        )
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"--out {out}: cannot write there ({parent} is a file, not a directory)")
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=parent))  # can we create a directory there?
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}: {e.filename})") from None
    return out


def save(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", out: str) -> None:
    """Save into a temporary directory next to `out`, then rename it to `out`: a crash never leaves
    half a model under --out."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)  # model.safetensors, config.json (dtype included), generation_config.json
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private, and safetensors writes 0600; a served model is shared
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.replace(tmp, out)  # atomic; replaces an empty --out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there after a failure


@torch.no_grad()
def logits_of(
    model: "PreTrainedModel", prompts: Sequence[Sequence[int]], device: torch.device | str
) -> list[torch.Tensor]:
    """fp32 CPU logits (1, T, vocab) of each prompt, run one at a time (no padding to get right)."""
    return [model(torch.tensor([p], device=device)).logits.float().cpu() for p in prompts]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Add merge's own options (--adapter, --weights, --out, --dtype, --from-original) to `ap`."""
    ap.add_argument("--adapter", action="append", required=True, help="adapter directory (repeat for several)")
    ap.add_argument("--weights", type=float, nargs="+", help="weight of each LoRA adapter, in --adapter order")
    ap.add_argument("--out", required=True, help="the merged model directory (must not exist, or be empty)")
    ap.add_argument("--dtype", choices=list(M.DTYPES), help="saved dtype (default: model.compute_dtype)")
    ap.add_argument(
        "--from-original",
        action="store_true",
        help="merge onto the original unquantized weights instead of the dequantized NF4 ones",
    )


def main(argv: Sequence[str] | None = None) -> float:
    """Merge, save and reload; return the largest |logit difference| of the saved model to base + adapters."""
    args = C.cli(__doc__.splitlines()[0], argv, add_arguments)
    try:
        cfg = C.load_config(args.config, args.overrides)
        lora.check_adapters(args.adapter, args.weights)
        out = check_out(args.out)
        if args.from_original:
            cfg["model"]["quantization"] = "none"
            cfg["model"]["compute_dtype"] = args.dtype or cfg["model"]["compute_dtype"]
        C.quiet_libraries()
        model, tok, base_path, device, dtype = C.load_base(cfg, gradient_checkpointing=False)
        lora.load_adapters(model, args.adapter, args.weights)
    except ValueError as e:  # ConfigError, ModelError, an adapter for another base, ...
        C.fail(e)
    out_dtype = M.DTYPES[args.dtype] if args.dtype else dtype
    prompts = [D.encode(tok, D.render_prompt(tok, q, "", cfg["data"]["system_prompt"])) for q in CHECK_PROMPTS]
    with M.autocast(device, dtype):
        before = logits_of(model, prompts, device)  # base + adapters, unmerged: the reference

    lora.merge(model, out_dtype)  # wrapped layers -> nn.Linear(W'), 4-bit ones dequantized first
    dequantize_rest(model, out_dtype)  # layers without an adapter (target_modules was a subset)
    model.to(out_dtype)  # embeddings, norms and lm_head too
    if hasattr(model.config, "quantization_config"):  # a pre-quantized checkpoint's: no longer true
        del model.config.quantization_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save(model, M.from_pretrained(AutoTokenizer, base_path), out)  # the tokenizer as the base ships it
    quant = cfg["model"]["quantization"]
    onto = "the original weights" if quant == "none" else f"the dequantized {quant} weights"
    print(
        f"merged {' + '.join(args.adapter)} onto {onto} of {base_path}; saved {out} in "
        f"{str(out_dtype).replace('torch.', '')}"
    )

    del model
    gc.collect()  # room for the reloaded copy (a 7B model is 15 GB in bf16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=out_dtype).to(device).eval()  # plain transformers
    after = logits_of(merged, prompts, device)
    diff = max((a - b).abs().max().item() for a, b in zip(after, before, strict=True))
    largest = max(b.abs().max().item() for b in before)
    print(
        f"largest |logit difference|, reloaded merged model vs base + adapters, over {len(prompts)} prompts: "
        f"{diff:.3g} (largest |logit| {largest:.3g}, relative {diff / largest:.2g})"
    )
    return diff


if __name__ == "__main__":
    main()
