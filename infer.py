"""Try a fine-tuned model: chat with the base + adapters, answer one prompt, or predict a file and score it.

    python infer.py config.yaml [section.key=value ...] [--adapter DIR ...] [--adapter-weight W ...]
                    [--prompt TEXT | --input FILE --output preds.jsonl]
                    [--temperature T] [--top-p P] [--max-new-tokens N]

The base loads as the config says (4-bit NF4, compute dtype, device), with zero, one or several adapters:
this project's or any PEFT LoRA/DoRA adapter directory, e.g. a federated client's global + local pair.
Prompts are rendered by data.py, the very code that built the training prompts.

    --prompt TEXT       one answer, streamed to the terminal
    --input FILE        an Alpaca, OpenAI-messages or ShareGPT JSON/JSONL file: predictions to --output
                        (JSONL), plus exact match, ROUGE-L and contains (the reference's words occur in
                        the answer) against each record's output (a conversation: its last assistant turn,
                        answered from everything before it), printed and written to <output>.metrics.json
    neither             an interactive multi-turn chat; /reset clears the history, /exit or Ctrl-D quits

With no --adapter the base model answers alone: that is the baseline the adapters are measured against.
--temperature 0 (the default) is greedy decoding; above 0, nucleus sampling with --top-p.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import config as C
import data as D
import lora
import model as M

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.generation import BaseStreamer

GEN_BATCH = 16  # prompts generated together in batch mode


# ----------------------------------------------------------------------------------------------------
# Adapters: several at once, each with a weight (merge.py uses the same two functions)


def check_adapters(dirs: Sequence[str], weights: Sequence[float] | None = None) -> list[float]:
    """The cheap checks, before any model loads: every directory exists, one weight per adapter.
    Returns the weights (1.0 each when none are given)."""
    for path in dirs:
        if not os.path.isdir(path):
            raise ValueError(f"adapter {path}: no such directory")
    if not weights:
        return [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise ValueError(f"{len(weights)} adapter weights for {len(dirs)} adapters: give one weight per adapter")
    return list(weights)


def load_adapters(model: nn.Module, dirs: Sequence[str], weights: Sequence[float] | None = None) -> list[str]:
    """Load adapter directories as a0, a1, ... and make them all active; returns their names.

    Active adapters add up: y = W x + b + sum_i w_i s_i B_i A_i x. A weight w_i scales adapter i's update
    by scaling its s (LoRA). DoRA rescales whole rows by m / ||W + s B A||, so its update is not a term
    that a weight could scale: a DoRA adapter only takes weight 1.

    Raises:
        ValueError: a missing directory, a file that is not a LoRA/DoRA adapter, an adapter made for
        another base (the message names the layer and both shapes), a weight on a DoRA adapter.
    """
    weights = check_adapters(dirs, weights)
    names = []
    for i, (path, w) in enumerate(zip(dirs, weights, strict=True)):
        name = f"a{i}"
        lora.load_adapter(model, path, name)
        try:
            lora.scale_adapter(model, name, w)
        except ValueError:
            raise ValueError(
                f"adapter {path}: a DoRA adapter cannot be weighted (weight {w}); use 1 or leave the weights out"
            ) from None
        names.append(name)
    if names:
        lora.set_active(model, names)
    return names


# ----------------------------------------------------------------------------------------------------
# Metrics


def normalize(text: str) -> str:
    """Strip and collapse runs of whitespace: "  a \n b " -> "a b"."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two texts are equal once normalized (normalize), else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def words(text: str) -> list[str]:
    """Lowercased words, punctuation dropped: "The capital is Paris." -> ["the", "capital", "is", "paris"]."""
    return re.findall(r"\w+", text.lower())


def contains(prediction: str, reference: str) -> float:
    """1.0 if the reference's words occur in the prediction, in a row (words): "The capital of France is
    Paris." contains "paris", "Parisian" does not. The usual score of a knowledge question, which a chat
    model answers in a sentence rather than in the reference's words alone."""
    p, r = words(prediction), words(reference)
    return float(any(p[i : i + len(r)] == r for i in range(len(p) - len(r) + 1)))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) over lowercased whitespace tokens:

        P = LCS / len(prediction),  R = LCS / len(reference),  F1 = 2 P R / (P + R)

    LCS is the longest common subsequence, by dynamic programming row by row: O(len(p) * len(r)) time.
    """
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)  # both empty: a perfect match; one empty: nothing in common
    prev = [0] * (len(r) + 1)  # prev[j] = LCS(p[:i], r[:j]) for the rows i done so far
    for token in p:
        row = [0]
        for j, other in enumerate(r, start=1):
            row.append(prev[j - 1] + 1 if token == other else max(prev[j], row[j - 1]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------
# The three modes


def generate(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    prompts: list[list[int]],
    device: torch.device,
    dtype: torch.dtype,
    gen: dict[str, float],
    streamer: "BaseStreamer | None" = None,
) -> list[list[int]]:
    """New token ids for each prompt (lists of ids), in the compute dtype."""
    with M.autocast(device, dtype):
        return M.generate(model, tok, prompts, streamer=streamer, **gen)


def predict(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    records: list[D.Record],
    system_prompt: str | None,
    device: torch.device,
    dtype: torch.dtype,
    gen: dict[str, float],
    progress: bool = True,
) -> list[str]:
    """One predicted answer per record (a conversation: its last assistant turn, from everything before
    it), generated in batches of prompts of similar length."""
    from tqdm import tqdm

    prompts = D.prompts(tok, records, system_prompt)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less left padding per batch
    answers = [None] * len(prompts)
    batches = range(0, len(order), GEN_BATCH)
    for start in tqdm(batches, desc="predicting", disable=None if progress else True, file=sys.stderr):
        idx = order[start : start + GEN_BATCH]
        for i, new in zip(idx, generate(model, tok, [prompts[i] for i in idx], device, dtype, gen), strict=True):
            answers[i] = tok.decode(new, skip_special_tokens=True).strip()
    return answers


def score(records: list[D.Record], answers: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(one result row per record, the mean metrics). A row starts with what was asked: instruction and
    input, or a conversation's messages before its last answer."""
    rows = [
        {
            **(
                {"messages": r["messages"][:-1]}
                if "messages" in r
                else {"instruction": r["instruction"], "input": r["input"]}
            ),
            "reference": D.reference(r),
            "prediction": a,
            "exact_match": exact_match(a, D.reference(r)),
            "rouge_l": rouge_l(a, D.reference(r)),
            "contains": contains(a, D.reference(r)),
        }
        for r, a in zip(records, answers, strict=True)
    ]
    n = len(rows)
    return rows, {
        "n": n,
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "contains": sum(r["contains"] for r in rows) / n,
    }


def chat(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    system_prompt: str | None,
    device: torch.device,
    dtype: torch.dtype,
    gen: dict[str, float],
) -> None:
    """A multi-turn chat on stdin/stdout: the whole conversation is the prompt of each new turn."""
    from transformers import TextStreamer

    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(start)
    if not tok.chat_template:
        print(
            "note: the tokenizer has no chat template, so each message is answered alone (Alpaca prompt)",
            file=sys.stderr,
        )
    print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C, or the end of a piped stdin
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if tok.chat_template:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = D.render_prompt(tok, line, "", system_prompt)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        new = generate(model, tok, [D.encode(tok, text)], device, dtype, gen, streamer)[0]
        messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})


# ----------------------------------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Add infer.py's options to the parser (the `extra` hook of config.cli)."""
    ap.add_argument("--adapter", action="append", default=[], help="adapter directory (repeat for several)")
    ap.add_argument(
        "--adapter-weight",
        type=float,
        action="append",
        default=[],
        help="weight of each LoRA adapter's update, in --adapter order (default 1)",
    )
    ap.add_argument("--prompt", help="answer this one instruction and stop")
    ap.add_argument("--input", help="Alpaca, OpenAI-messages or ShareGPT JSON/JSONL file to predict and score")
    ap.add_argument("--output", help="predictions JSONL for --input (metrics go to <output>.metrics.json)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when temperature > 0")
    ap.add_argument("--max-new-tokens", type=int, default=256)


def check_outputs(args: argparse.Namespace) -> str | None:
    """Batch mode's two files: refused if either exists, and their folder must be creatable."""
    if args.prompt is not None and args.input:
        raise ValueError("--prompt and --input: give one or the other")
    if bool(args.input) != bool(args.output):
        raise ValueError("--input and --output go together: predict the --input file into the --output JSONL")
    if not args.output:
        return None
    metrics_path = os.path.splitext(args.output)[0] + ".metrics.json"
    for path in (args.output, metrics_path):
        if os.path.exists(path):
            raise ValueError(f"--output: {path} already exists; choose another name or delete it")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {args.output}: cannot create its folder ({e.strerror})") from None
    return metrics_path


def main(argv: Sequence[str] | None = None) -> None:
    """Load the base and the adapters, then answer --prompt, predict and score --input, or chat."""
    args = C.cli(__doc__.splitlines()[0], argv, add_arguments)
    try:
        cfg = C.load_config(args.config, args.overrides)
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
            raise ValueError("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
        check_adapters(args.adapter, args.adapter_weight)
        metrics_path = check_outputs(args)
        records = D.load_records(args.input, cfg["data"]["field_map"] or None) if args.input else None
        C.quiet_libraries()
        model, tok, base_path, device, dtype = C.load_base(cfg, gradient_checkpointing=False)
        names = load_adapters(model, args.adapter, args.adapter_weight)
        if records:
            D.prompts(tok, records, cfg["data"]["system_prompt"])  # every record renders (ms; before any output)
    except ValueError as e:  # ConfigError, DataError, ModelError and lora's errors are all ValueErrors
        C.fail(e)
    what = " + ".join([base_path, *args.adapter]) if names else f"{base_path} with no adapter"
    print(f"model: {what}, on {device} in {str(dtype).replace('torch.', '')}", file=sys.stderr)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    system_prompt = cfg["data"]["system_prompt"]

    if args.prompt is not None:
        from transformers import TextStreamer

        ids = D.encode(tok, D.render_prompt(tok, args.prompt, "", system_prompt))
        generate(model, tok, [ids], device, dtype, gen, TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    elif args.input:
        rows, metrics = score(records, predict(model, tok, records, system_prompt, device, dtype, gen))
        metrics.update(
            file=args.input, base=base_path, adapters=args.adapter, adapter_weights=args.adapter_weight, **gen
        )
        with open(args.output, "x", encoding="utf-8") as f:  # "x": never replace a file that appeared meanwhile
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(metrics_path, "x") as f:
            json.dump(metrics, f, indent=2)
        print(
            f"exact_match {metrics['exact_match']:.4f}  rouge_l {metrics['rouge_l']:.4f}  "
            f"contains {metrics['contains']:.4f}  over {metrics['n']} "
            f"records; predictions in {args.output}, metrics in {metrics_path}"
        )
    else:
        chat(model, tok, system_prompt, device, dtype, gen)


if __name__ == "__main__":
    main()
