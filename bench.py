"""Benchmarks, measured as ratios inside one run (the implementations alternate, so machine noise hits
all of them alike).

    python bench.py --layer            # one NF4 linear layer: our LoRA vs our DoRA vs PEFT's DoRA

peft is used here only as the reference we compare against.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import lora


def nf4_linear(in_f, out_f, compute_dtype, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=False)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                          compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    q = q.to("cuda" if torch.cuda.is_available() else "cpu")
    lora.keep_standard_layout(q)
    return q


def layer_impls(args, dtype):
    """name -> (module, trainable params): the same NF4 weight under each adapter implementation."""
    impls = {}
    for name, dora in (("ours-lora", False), ("ours-dora", True)):
        m = lora.LoRALinear(nf4_linear(args.hidden, args.hidden, dtype))
        m.add_adapter("default", r=args.r, alpha=2 * args.r, use_dora=dora)
        impls[name] = m
    if args.compare_peft:
        import peft

        holder = nn.Module()
        holder.proj = nf4_linear(args.hidden, args.hidden, dtype)
        holder.is_loaded_in_4bit = True  # PEFT's cue to use its bitsandbytes layer
        cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"], use_dora=True)
        impls["peft-dora"] = peft.get_peft_model(holder, cfg).base_model.model.proj
    return {k: (m.train(), [p for p in m.parameters() if p.requires_grad]) for k, m in impls.items()}


def bench_layer(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = layer_impls(args, dtype)
    x = torch.randn(args.batch, args.seq, args.hidden, device=device)
    times = {k: [] for k in impls}
    for it in range(args.steps + 1):
        for name, (m, params) in impls.items():
            opt = torch.optim.SGD(params, lr=1e-4)  # a step changes A and B, as in training (DoRA's norm)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                y = m(x)
            y.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if it > 0:  # the first round is warm-up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(json.dumps({"impl": k, "ms": round(v * 1e3, 2), "tokens": args.batch * args.seq, "dtype": args.dtype,
                          "device": device, "hidden": args.hidden, "r": args.r}))
    print(f"ours-dora / ours-lora = {med['ours-dora'] / med['ours-lora']:.2f}x")
    if "peft-dora" in med:
        print(f"peft-dora / ours-dora = {med['peft-dora'] / med['ours-dora']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", action="store_true", help="benchmark one NF4 linear layer's forward+backward")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    ap.add_argument("--compare-peft", action="store_true")
    args = ap.parse_args()
    if not args.layer:
        ap.error("choose a benchmark: --layer")
    bench_layer(args)


if __name__ == "__main__":
    main()
