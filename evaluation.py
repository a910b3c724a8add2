"""How good is the model on held-out data: the eval loss, greedy answers, and their scores.

    metrics = evaluate(model, examples, batch_size, collate, device, dtype)   # {eval_loss, eval_ppl}
    answers = predict(model, tok, records, system_prompt, device, dtype, greedy)
    rows, means = score(records, answers)        # exact_match, rouge_l, contains per record, and means

train.py evaluates through eval_metrics, the federated clients (client.py) through evaluate and predict,
infer.py's batch mode through predict and score: one definition of each number. Under torchrun each rank
takes its share and the sums are added up (distributed.py). Library module: plain arguments, no config.
"""

import math
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import data as D
import distributed
import loss as L
import model as M

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.generation import BaseStreamer

GEN_BATCH = 16  # prompts generated together


# ----------------------------------------------------------------------------------------------------
# Scores of one answer against its reference


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
# Greedy (or sampled) answers


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


# ----------------------------------------------------------------------------------------------------
# The eval loss, and the numbers train.py logs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[D.Example],
    batch_size: int,
    collate: Callable[[list[D.Example]], D.Batch],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Mean response-token loss and its perplexity over `examples`; under torchrun each rank takes its
    share of the batches and the sums are added up, so that evaluation costs 1 / ranks."""
    was_training = model.training
    model.eval()
    rank, world = distributed.rank_and_world()
    total, count = 0.0, 0
    for idx in D.batch_indices([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True)[rank::world]:
        batch = {k: v.to(device) for k, v in collate([examples[j] for j in idx]).items()}
        with M.autocast(device, dtype):
            loss, n = L.loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = distributed.all_sum([total, count])
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50))}


def eval_metrics(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    examples: list[D.Example],
    records: list[D.Record],
    batch_size: int,
    collate: Callable[[list[D.Example]], D.Batch],
    device: torch.device,
    dtype: torch.dtype,
    max_new_tokens: int,
    system_prompt: str | None,
) -> dict[str, float]:
    """evaluate()'s loss and perplexity, plus, unless max_new_tokens is 0, the exact match of the greedy
    answers to the eval records (as `infer.py --input` scores them), each rank answering its share of the
    records under torchrun."""
    metrics = evaluate(model, examples, batch_size, collate, device, dtype)
    if max_new_tokens:
        greedy = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
        rank, world = distributed.rank_and_world()
        mine = records[rank::world]
        answers = predict(model, tok, mine, system_prompt, device, dtype, greedy, progress=False)
        hits = sum(exact_match(a, D.reference(r)) for r, a in zip(mine, answers, strict=True))
        hits, n = distributed.all_sum([hits, len(mine)])
        metrics["exact_match"] = hits / n
    return metrics


def describe(metrics: dict[str, float]) -> str:
    """'eval_loss 1.2345, exact_match 0.900': one eval for the log line."""
    return ", ".join(
        f"{k} {metrics[k]:.{4 if k == 'eval_loss' else 3}f}" for k in ("eval_loss", "exact_match") if k in metrics
    )
