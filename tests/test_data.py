"""data.py on CPU with a tiny byte-level BPE tokenizer trained on the demo texts (no downloads)."""

import copy
import filecmp
import importlib.util
import json
import os
import re
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import data
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data")
_spec = importlib.util.spec_from_file_location("make_demo", os.path.join(DATA_DIR, "make_demo.py"))
make_demo = importlib.util.module_from_spec(_spec)  # the demo generator, a script beside the files it writes
_spec.loader.exec_module(make_demo)
# ChatML as in Qwen2's template, without its default system message
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(data.demo_texts(DATA_DIR), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def alpaca_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def records():
    """Every federated demo record: the clients' files, one after the other."""
    return [r for c in make_demo.CLIENTS for r in data.load_records(os.path.join(DATA_DIR, "clients", f"{c}.json"))]


@pytest.fixture(scope="module")
def single():
    """The single-model demo, data/demo.json."""
    return data.load_records(os.path.join(DATA_DIR, "demo.json"))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- prompts and masking


def test_chatml_prompt_and_response(tok):
    assert (
        data.render_prompt(tok, "Opposite of hot?")
        == "<|im_start|>user\nOpposite of hot?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        data.render_prompt(tok, "Classify.", "Nice.", system_prompt="Be brief.")
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nClassify.\n\nNice.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_alpaca_fallback(alpaca_tok):
    prompt = data.render_prompt(alpaca_tok, "Classify.", "Nice.")
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert "### Instruction:\nClassify.\n\n### Input:\nNice.\n\n" in prompt
    assert "### Input" not in data.render_prompt(alpaca_tok, "Opposite of hot?")
    assert data.render_prompt(alpaca_tok, "Hi", system_prompt="Be brief.").startswith("Be brief.\n\n###")
    ex = data.tokenize_example(alpaca_tok, {"instruction": "Opposite of hot?", "output": "cold"})
    assert ex["labels"][-1] == ex["input_ids"][-1] == alpaca_tok.eos_token_id
    assert alpaca_tok.decode([t for t in ex["labels"] if t != -100]) == "cold<|endoftext|>"


def test_masking(tok, records):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for r in records[:200]:
        ex = data.tokenize_example(tok, r, max_seq_len=256)
        prompt = data.encode(tok, data.render_prompt(tok, r["instruction"], r["input"]))
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) and ids[: len(prompt)] == prompt
        assert all(label == -100 for label in labels[: len(prompt)])  # no prompt token is trained
        assert labels[len(prompt) :] == ids[len(prompt) :] and len(labels) > len(prompt)
        assert labels[-2] == im_end and tok.decode(labels[len(prompt) :]) == r["output"] + "<|im_end|>\n"


def test_train_on_all_and_last(tok, records):
    ex = data.tokenize_example(tok, records[0], train_on="all")
    assert ex["labels"] == ex["input_ids"]
    assert data.tokenize_example(tok, records[0], train_on="last") == data.tokenize_example(tok, records[0])


def test_truncation_drops_and_reports_once(tok, capsys):
    short = {"instruction": "Opposite of hot?", "input": "", "output": "cold"}
    long = {"instruction": "word " * 100, "input": "", "output": "cold"}
    n_prompt = len(data.encode(tok, data.render_prompt(tok, short["instruction"])))
    ex = data.tokenize_example(tok, short, max_seq_len=n_prompt + 1)
    assert len(ex["input_ids"]) == n_prompt + 1 and ex["labels"][-1] != -100  # one answer token survives
    assert data.tokenize_example(tok, short, max_seq_len=n_prompt) is None
    kept = data.tokenize_records(tok, [short, long, long, short], max_seq_len=32, name="eval")
    assert len(kept) == 2 and all(len(e["input_ids"]) <= 32 for e in kept)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["warning: eval: dropped 2 of 4 examples with no trained token within max_seq_len=32"]


def test_demo_prompts_are_short(tok, records):
    assert max(len(data.encode(tok, data.render_prompt(tok, r["instruction"], r["input"]))) for r in records) < 40
    assert max(len(r["output"].split()) for r in records) <= 4


# ----------------------------------------------------------------------------- batches


def test_collate_pads_to_multiple_of_8():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": list(range(1, 11)), "labels": list(range(1, 11))},
    ]
    batch = data.collate(examples, pad_id=0)
    assert all(batch[k].shape == (2, 16) and batch[k].dtype == torch.long for k in batch)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert data.collate(examples, pad_id=0, multiple_of=1)["input_ids"].shape == (2, 10)


@pytest.mark.parametrize("group", [False, True])
def test_batch_indices(group):
    lengths = [(i * 37) % 101 for i in range(1003)]
    batches = data.batch_indices(lengths, 4, seed=1, epoch=2, group_by_length=group)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 3 and all(len(b) <= 4 for b in batches)
    assert batches == data.batch_indices(lengths, 4, seed=1, epoch=2, group_by_length=group)
    assert batches != data.batch_indices(lengths, 4, seed=1, epoch=3, group_by_length=group)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert (spread < 10) == group  # grouped batches hold similar lengths
    if group:
        starts = [lengths[b[0]] for b in batches]
        assert starts != sorted(starts, reverse=True)  # but the batch order is shuffled


# ----------------------------------------------------------------------------- splits


def test_split_eval(records):
    train, eval_set = data.split_eval(records, 0.1, seed=3)
    assert len(eval_set) == round(0.1 * len(records)) and len(train) + len(eval_set) == len(records)
    assert (train, eval_set) == data.split_eval(records, 0.1, seed=3)
    assert eval_set != data.split_eval(records, 0.1, seed=4)[1]
    assert len(data.split_eval(records[:5], 0.01, seed=0)[1]) == 1
    assert data.split_eval(records, 0.0, seed=0) == (records, [])
    with pytest.raises(DataError):
        data.split_eval(records, 1.5, seed=0)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition(records, method):
    parts = data.partition(records, 5, method=method, alpha=0.3, seed=7)
    assert parts == data.partition(records, 5, method=method, alpha=0.3, seed=7)
    assert parts != data.partition(records, 5, method=method, alpha=0.3, seed=8)
    assert sorted(id(r) for p in parts for r in p) == sorted(id(r) for r in records)  # each record once
    assert all(parts)
    if method == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def category_skew(parts, categories):
    """Each client's total-variation distance between its category mix and the whole data's (uniform here)."""
    out = []
    for part in parts:
        counts = Counter(r["category"] for r in part)
        out.append(0.5 * sum(abs(counts[c] / len(part) - 1 / len(categories)) for c in categories))
    return out


def test_dirichlet_skew_follows_alpha():
    """Small alpha: each client concentrated on few of the 10 categories; large alpha: close to an iid split."""
    categories = [f"c{i}" for i in range(10)]
    recs = [{"category": c, "instruction": str(i)} for c in categories for i in range(100)]
    for seed in range(5):
        iid = category_skew(data.partition(recs, 5, method="iid", seed=seed), categories)
        skewed = data.partition(recs, 5, method="dirichlet", alpha=0.05, seed=seed)
        near_iid = data.partition(recs, 5, method="dirichlet", alpha=1000, seed=seed)
        assert sum(iid) / 5 < 0.1  # the measure reads an iid split as unskewed
        assert sum(category_skew(skewed, categories)) / 5 > 0.4
        top2 = [sum(n for _, n in Counter(r["category"] for r in p).most_common(2)) / len(p) for p in skewed]
        assert sorted(top2)[2] > 0.6  # most clients hold mostly two categories (of 10)
        assert max(category_skew(near_iid, categories)) < 0.05
        assert all(180 <= len(p) <= 220 for p in near_iid)  # and near-equal sizes


def test_partition_never_leaves_a_client_empty():
    recs = [{"category": "a"}] * 6 + [{"category": "b"}] * 2
    for seed in range(20):
        parts = data.partition(recs, 6, method="dirichlet", alpha=0.05, seed=seed)
        assert all(parts) and sum(map(len, parts)) == 8


def test_partition_bad_args(records):
    for kwargs in [
        dict(n_clients=0),
        dict(n_clients=2, method="dirichlet", alpha=0),
        dict(n_clients=2, method="shards"),
        dict(n_clients=len(records) + 1),
    ]:
        with pytest.raises(DataError):
            data.partition(records, **kwargs)
    with pytest.raises(DataError, match='record 2: field "category" is missing'):
        data.partition([{"category": "a"}, {}], 2, method="dirichlet")


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("x.json", "", "x.json: file is empty"),
        ("x.json", '{\n "a": 1\n}', "x.json: expected a JSON list of records, got dict"),
        (
            "x.json",
            '[\n{"instruction": "a" "output": "b"}\n]',
            r"x.json, line 2: invalid JSON \(Expecting ',' delimiter\)",
        ),
        (
            "x.jsonl",
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "a",\n',
            r"x.jsonl, line 3: invalid JSON \(Expecting",
        ),
        (
            "x.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
            'x.json, record 2: field "output" is missing',
        ),
        (
            "x.json",
            '[{"instruction": "a", "input": 3, "output": "b"}]',
            'x.json, record 1: field "input" must be a string, got int',
        ),
        ("x.json", '[{"instruction": "a", "output": " "}]', 'x.json, record 1: field "output" is empty'),
        ("x.json", '[{"instruction": "", "output": "b"}]', 'x.json, record 1: field "instruction" is empty'),
        ("x.json", '[["a", "b"]]', "x.json, record 1: expected a JSON object, got list"),
        (
            "x.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n',
            'x.jsonl, line 2: field "output" must be a string, got null',
        ),
    ],
)
def test_bad_input(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        data.load_records(write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.json: file not found"):
        data.load_records(tmp_path / "missing.json")


def test_jsonl_and_field_map(tmp_path):
    lines = [
        {"instruction": "Name a fruit.", "context": "", "response": "apple", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats sleep."},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    dolly = {"instruction": "instruction", "input": "context", "output": "response"}
    for name in ["dolly.jsonl", "dolly.json"]:  # a .json file of JSON lines is recognised by content
        got = data.load_records(write(tmp_path, name, text), field_map=dolly)
        assert [r.pop("_where") for r in got] == [f"{tmp_path / name}, {w}" for w in ("line 1", "line 2")]
        assert got == [
            {"instruction": "Name a fruit.", "input": "", "output": "apple", "category": "open_qa"},
            {"instruction": "Summarise.", "input": "Cats sleep a lot.", "output": "Cats sleep."},
        ]
    with pytest.raises(DataError, match='line 1: field "output" is missing'):
        data.load_records(write(tmp_path, "dolly.jsonl", text))


# ----------------------------------------------------------------------------- demo data


def test_make_demo_matches_committed_files(tmp_path):
    make_demo.make_demo(tmp_path / "a")
    make_demo.make_demo(tmp_path / "b")
    names = ["demo.json"] + [f"clients/{c}.json" for c in make_demo.CLIENTS]
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)
        assert filecmp.cmp(tmp_path / "a" / name, os.path.join(DATA_DIR, name), shallow=False), (
            f"data/{name} differs from make_demo(): run python data/make_demo.py"
        )


def test_demo_layout(records):
    clients = {c: data.load_records(os.path.join(DATA_DIR, "clients", f"{c}.json")) for c in make_demo.CLIENTS}
    for c, recs in clients.items():
        assert 150 <= len(recs) <= 400 and {r["client"] for r in recs} == {c}
        assert sum(r["category"] == "translate" for r in recs) >= len(recs) // 3  # the conflict is a big share
        assert {r["category"] for r in recs} == {"translate", "opposite", "kind", "sentiment"}
    assert any(r["input"] for r in records)


def test_conflict_category(records):
    answers = {}  # translate instruction -> {client: output}
    for r in records:
        if r["category"] == "translate":
            answers.setdefault(r["instruction"], {}).setdefault(r["client"], set()).add(r["output"])
    assert len(answers) >= 15
    for per_client in answers.values():
        assert set(per_client) == set(make_demo.CLIENTS) and all(len(o) == 1 for o in per_client.values())
        assert len(set.union(*per_client.values())) == len(make_demo.CLIENTS)  # a different answer on each client


def test_shared_answers_agree_and_are_learnable(records):
    answers = {}  # (instruction, input) -> outputs over all clients
    for r in records:
        if r["category"] != "translate":
            answers.setdefault((r["instruction"], r["input"]), set()).add(r["output"])
    assert all(len(o) == 1 for o in answers.values())
    # every fact of a shared task is asked at least 3 times, so an eval split leaves some in train
    for category in ["opposite", "kind", "sentiment"]:
        texts = [f"{r['instruction']} {r['input']}" for r in records if r["category"] == category]
        for word, _ in make_demo._shared_facts(category):
            assert sum(bool(re.search(rf"\b{word}\b", t)) for t in texts) >= 3, (category, word)


def test_single_model_demo_has_one_answer_per_prompt_and_no_repeats(single, records):
    prompts = [(r["instruction"], r["input"]) for r in single]
    assert len(set(prompts)) == len(prompts)  # each prompt once: an eval record is never a train record
    assert {r["category"] for r in single} == {"translate", "opposite", "kind", "sentiment"}
    assert "client" not in single[0]
    fr = {(r["instruction"], r["input"]): r["output"] for r in records if r.get("client") == "fr"}
    for r in single:  # the translations are fr's, and every other answer agrees with the clients'
        if (r["instruction"], r["input"]) in fr:
            assert fr[(r["instruction"], r["input"])] == r["output"]
    # every fact is asked in several phrasings, so a held-out record asks a fact seen in other phrasings
    for category in ["opposite", "kind", "sentiment"]:
        texts = [f"{r['instruction']} {r['input']}" for r in single if r["category"] == category]
        for word, _ in make_demo._shared_facts(category):
            assert sum(bool(re.search(rf"\b{word}\b", t)) for t in texts) >= 3, (category, word)


def test_tokenizer_texts_come_from_the_client_files(records):
    assert data.DEMO_CLIENTS == make_demo.CLIENTS  # the files the generator writes, in its order
    assert data.demo_texts(DATA_DIR) == [t for r in records for t in (r["instruction"], r["input"], r["output"]) if t]
