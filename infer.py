"""Try a fine-tuned model: chat with the base + adapters, answer one prompt, or predict a file and score it.

    python infer.py config.yaml [section.key=value ...] [--adapter DIR ...] [--adapter-weight W ...]
                    [--prompt TEXT | --input FILE --output preds.jsonl | --benchmark mmlu [--limit N]]
                    [--temperature T] [--top-p P] [--max-new-tokens N]

The base loads as the config says (4-bit NF4, compute dtype, device), with zero, one or several adapters:
this project's or any PEFT LoRA/DoRA adapter directory, e.g. a federated client's global + local pair.
Prompts are rendered by data.py, the very code that built the training prompts.

    --prompt TEXT       one answer, streamed to the terminal
    --input FILE        an Alpaca, OpenAI-messages or ShareGPT JSON/JSONL file: predictions to --output
                        (JSONL), plus exact match, ROUGE-L and contains (the reference's words occur in
                        the answer) against each record's output (a conversation: its last assistant turn,
                        answered from everything before it), printed and written to <output>.metrics.json
    --benchmark mmlu    MMLU 0-shot accuracy, overall and per category, by lm-evaluation-harness in this
                        process (benchmark.py); --limit N: the first N questions of the file; with
                        --output, one row a question there and the accuracies in <output>.metrics.json
    none of them        an interactive multi-turn chat; /reset clears the history, /exit or Ctrl-D quits

With no --adapter the base model answers alone: that is the baseline the adapters are measured against.
--temperature 0 (the default) is greedy decoding; above 0, nucleus sampling with --top-p.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

import benchmark as B
import config as C
import data as D
import evaluation
import lora

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# ----------------------------------------------------------------------------------------------------
# The interactive mode (--prompt and --input are in main)


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
        new = evaluation.generate(model, tok, [D.encode(tok, text)], device, dtype, gen, streamer)[0]
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
    ap.add_argument(
        "--output", help="predictions JSONL for --input or --benchmark (metrics go to <output>.metrics.json)"
    )
    ap.add_argument("--benchmark", choices=B.BENCHMARKS, help="score the model on a standard benchmark")
    ap.add_argument("--limit", type=int, help="--benchmark: the first N questions only")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when temperature > 0")
    ap.add_argument("--max-new-tokens", type=int, default=256)


def check_outputs(args: argparse.Namespace) -> str | None:
    """Batch mode's two files (and --benchmark's, if it has --output): refused if either exists, and
    their folder must be creatable."""
    if sum([args.prompt is not None, bool(args.input), bool(args.benchmark)]) > 1:
        raise ValueError("--prompt, --input and --benchmark: give one of them")
    if args.limit is not None and (not args.benchmark or args.limit < 1):
        raise ValueError("--limit goes with --benchmark and needs a number >= 1")
    if bool(args.input) != bool(args.output) and not args.benchmark:
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


def write_results(output: str, metrics_path: str, rows: list[dict], metrics: dict) -> None:
    """One JSON line a row into `output`, the metrics into `metrics_path`; "x": never replace a file
    that appeared meanwhile."""
    with open(output, "x", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(metrics_path, "x") as f:
        json.dump(metrics, f, indent=2)


def main(argv: Sequence[str] | None = None) -> None:
    """Load the base and the adapters, then answer --prompt, predict and score --input, or chat."""
    args = C.cli(__doc__.splitlines()[0], argv, add_arguments)
    try:
        cfg = C.load_config(args.config, args.overrides)
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
            raise ValueError("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
        lora.check_adapters(args.adapter, args.adapter_weight)
        metrics_path = check_outputs(args)
        records = D.load_records(args.input, cfg["data"]["field_map"] or None) if args.input else None
        if args.benchmark:  # lm-eval installed and the questions read before the model loads
            B.require_lm_eval()
            questions = B.mmlu_questions(cfg["model"]["cache_dir"], args.limit)
        C.quiet_libraries()
        model, tok, base_path, device, dtype = C.load_base(cfg, gradient_checkpointing=False)
        names = lora.load_adapters(model, args.adapter, args.adapter_weight)
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
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        evaluation.generate(model, tok, [ids], device, dtype, gen, streamer)
    elif args.benchmark:
        t0 = time.time()
        result, rows = B.mmlu(model, tok, questions, device, dtype)
        result["seconds"] = round(time.time() - t0, 1)
        if args.output:
            result.update(benchmark=args.benchmark, base=base_path, adapters=args.adapter,
                          adapter_weights=args.adapter_weight, dtype=str(dtype).replace("torch.", ""))  # fmt: skip
            write_results(args.output, metrics_path, rows, result)
        print(f"{args.benchmark}: {B.describe(result)}; scored in {result['seconds']:.0f} s")
        print(f"{args.benchmark} accuracy {result['accuracy']:.4f} on {result['n']} questions")
    elif args.input:
        answers = evaluation.predict(model, tok, records, system_prompt, device, dtype, gen)
        rows, metrics = evaluation.score(records, answers)
        metrics.update(
            file=args.input, base=base_path, adapters=args.adapter, adapter_weights=args.adapter_weight, **gen
        )
        write_results(args.output, metrics_path, rows, metrics)
        print(
            f"exact_match {metrics['exact_match']:.4f}  rouge_l {metrics['rouge_l']:.4f}  "
            f"contains {metrics['contains']:.4f}  over {metrics['n']} "
            f"records; predictions in {args.output}, metrics in {metrics_path}"
        )
    else:
        chat(model, tok, system_prompt, device, dtype, gen)


if __name__ == "__main__":
    main()
