r"""Instruction data for causal-LM fine-tuning: load, render, tokenize, batch, split and partition.

A record is Alpaca-style, {"instruction", "input" (optional), "output"}, plus the optional "category" and
"client" of the federated demo, in a JSON list (.json) or JSON lines (.jsonl); field_map reads other
schemas (Dolly's context/response). One example is a prompt followed by a response:

    prompt   = render_prompt(tok, instruction, input)  # up to where the answer begins
    response = render_response(tok, output)            # the answer and the end-of-turn marker

With a chat template (Qwen's ChatML) that is, prompt | response:

    <|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n | {output}<|im_end|>\n

and without one the Alpaca template ("### Instruction: ... ### Response:\n" | output + eos_token).
infer.py calls render_prompt too, so the model is prompted at inference exactly as it was trained.

    input_ids = encode(prompt) + encode(response)
    labels    = [-100] * len(encode(prompt)) + encode(response)

-100 is the ignore_index of F.cross_entropy: those positions add nothing to the loss, so the model learns
to write the answer, not to model the prompt. labels are aligned with input_ids; the loss shifts them by
one (logits[:, :-1] predict labels[:, 1:]). Prompt and response are encoded separately (with
add_special_tokens=False: the template text already holds any BOS) because BPE may merge characters
across the boundary; apart, the mask boundary is exact and the prompt ids are the very ids that
generation starts from.
"""

import json
import os
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
FIELDS = ("instruction", "input", "output", "category", "client")
REQUIRED = ("instruction", "output")


class DataError(ValueError):
    """Bad input data; the message names the file and the record, line or field."""


# ----------------------------------------------------------------------------- loading


def load_records(path: str | os.PathLike[str], field_map: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Read Alpaca-style records from a JSON list or a JSON-lines file.

    Args:
        path: a .json file holding a list of objects, or a .jsonl file with one object per line
            (a .json file whose lines are each an object is read as JSON lines too).
        field_map: our field name -> the file's, e.g. Dolly's
            {"instruction": "instruction", "input": "context", "output": "response"}.
    Returns:
        dicts with keys instruction, input ("" if absent), output, and category, client where present.
    Raises:
        DataError: naming the file and the record (counted from 1) or line.
    """
    path = str(path)
    unknown = sorted(set(field_map or {}) - set(FIELDS))
    if unknown:
        raise DataError(f"field_map: unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    names = {**{f: f for f in FIELDS}, **(field_map or {})}  # our name -> the file's name
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    raw = _read_json_lines(path, text) if _is_json_lines(path, text) else _read_json_list(path, text)
    if not raw:
        raise DataError(f"{path}: no records")
    return [_normalise(obj, f"{path}, {where}", names) for where, obj in raw]


def _is_json_lines(path: str, text: str) -> bool:
    """.jsonl by name, or by content: several lines of which the first is a whole JSON object."""
    if text.lstrip().startswith("["):
        return False  # a JSON list, whatever the name says
    if path.endswith(".jsonl"):
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return len(lines) > 1 and isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _read_json_lines(path: str, text: str) -> list[tuple[str, object]]:
    out = []  # (place, object)
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
    return out


def _read_json_list(path: str, text: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type(data)}")
    return [(f"record {i}", obj) for i, obj in enumerate(data, start=1)]


def _normalise(obj: object, where: str, names: dict[str, str]) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type(obj)}")
    record = {}
    for field in FIELDS:
        name = names[field]
        value = obj.get(name)
        if name not in obj or (value is None and field not in REQUIRED):
            if field in REQUIRED:
                raise DataError(f'{where}: field "{name}" is missing')
            if field == "input":
                record["input"] = ""
            continue
        if not isinstance(value, str):
            raise DataError(f'{where}: field "{name}" must be a string, got {_type(value)}')
        if field in REQUIRED and not value.strip():
            raise DataError(f'{where}: field "{name}" is empty')
        record[field] = value
    return record


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- prompts and tokens

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


def render_prompt(
    tokenizer: "PreTrainedTokenizerBase", instruction: str, input: str = "", system_prompt: str | None = None
) -> str:
    """The prompt text up to where the assistant's answer begins (its generation prompt)."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": instruction + ("\n\n" + input if input else "")})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    preamble = system_prompt or (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)
    text = f"{preamble}\n\n### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    # chat templates write BOS themselves; here we must, for models that expect one (Llama)
    return (tokenizer.bos_token or "") + text + "### Response:\n"


def render_response(tokenizer: "PreTrainedTokenizerBase", output: str) -> str:
    """The text after the prompt: the answer and whatever closes the assistant's turn."""
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has no eos_token, which ends every response of the Alpaca template")
        return output + tokenizer.eos_token
    # Only the template knows how an assistant turn ends (<|im_end|>\n for ChatML, <|eot_id|> for Llama 3):
    # render a conversation with and without the answer and keep what the answer added.
    messages = [{"role": "user", "content": "?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders an answered conversation that does not start with its "
            "generation prompt, so prompt and response cannot be split"
        )
    return full[len(prompt) :]


def encode(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Token ids of text as written: special tokens in the text (<|im_start|>) are kept, none are added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(
    tokenizer: "PreTrainedTokenizerBase",
    record: dict[str, str],
    max_seq_len: int = 1024,
    system_prompt: str | None = None,
    train_on_prompt: bool = False,
) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} of one record, cut to max_seq_len; None if the prompt alone fills it."""
    prompt = encode(tokenizer, render_prompt(tokenizer, record["instruction"], record.get("input", ""), system_prompt))
    response = encode(tokenizer, render_response(tokenizer, record["output"]))
    if len(prompt) >= max_seq_len:
        return None  # not one answer token would survive truncation: nothing to learn
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
    return {"input_ids": (prompt + response)[:max_seq_len], "labels": labels[:max_seq_len]}


def tokenize_records(
    tokenizer: "PreTrainedTokenizerBase",
    records: Iterable[dict[str, str]],
    max_seq_len: int,
    system_prompt: str | None = None,
    train_on_prompt: bool = False,
    name: str = "train",
) -> list[dict[str, list[int]]]:
    """tokenize_example over records; reports in one line how many were dropped."""
    examples = [tokenize_example(tokenizer, r, max_seq_len, system_prompt, train_on_prompt) for r in records]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        print(
            f"warning: {name}: dropped {len(examples) - len(kept)} of {len(examples)} examples whose prompt "
            f"fills max_seq_len={max_seq_len}",
            file=sys.stderr,
        )
    return kept


# ----------------------------------------------------------------------------- batches


def collate(
    examples: Sequence[dict[str, list[int]]], pad_id: int | None, multiple_of: int | None = 8
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into LongTensors input_ids, labels, attention_mask, each (B, T).

    T is the longest example rounded up to a multiple of multiple_of: fewer distinct shapes, and
    tensor-core matmuls like dimensions divisible by 8. Padding gets label -100 and mask 0.
    """
    if pad_id is None:
        raise ValueError("pad_id is None: pass tokenizer.pad_token_id (or eos_token_id if it has no pad token)")
    multiple_of = multiple_of or 1
    B, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    T = -(-longest // multiple_of) * multiple_of  # ceil(longest / multiple_of) * multiple_of
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_indices(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0, group_by_length: bool = False
) -> list[list[int]]:
    """One epoch of batches of example indices, shuffled by (seed, epoch) alone.

    group_by_length cuts padding: shuffle, sort by length (longest first) within mega-chunks of 50
    batches, cut into batches, then shuffle the batch order, so a batch holds similar lengths yet the
    order of lengths is random. Every index appears exactly once; the last short batch is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])  # our own generator: the global RNG stays untouched
    order = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return _chunks(order, batch_size)
    batches = []
    for chunk in _chunks(order, 50 * batch_size):
        batches += _chunks(sorted(chunk, key=lambda i: -lengths[i]), batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- splits


def split_eval(
    records: Sequence[dict[str, str]], fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval): a random eval share of round(fraction * n) records, at least 1 if fraction > 0.

    Train keeps at least one record, and both lists keep the records' original order.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(records)
    n_eval = min(max(round(fraction * n), int(fraction > 0)), max(n - 1, 0))
    in_eval = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in in_eval], [r for i, r in enumerate(records) if i in in_eval])


def partition(
    records: Sequence[dict[str, str]],
    n_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    key: str = "category",
) -> list[list[dict[str, str]]]:
    """Split records among n_clients to simulate federated clients; each record goes to one client.

    iid: shuffle and deal out like cards (sizes differ by at most one).
    dirichlet: label-skewed non-IID split (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", Sec. 3): for each value c of record[key],
    p_c ~ Dir(alpha * 1_K) and client k receives a share p_c[k] of c's records. Small alpha (0.1): each
    client sees few categories; large alpha (100): close to iid. A client left empty gets one record
    from the largest client.
    """
    if n_clients < 1:
        raise DataError(f"n_clients must be >= 1, got {n_clients}")
    if n_clients > len(records):
        raise DataError(f"cannot give each of {n_clients} clients a record: there are only {len(records)}")
    rng = np.random.default_rng(seed)
    if method == "iid":
        order = rng.permutation(len(records))
        shares = [order[k::n_clients].tolist() for k in range(n_clients)]
    elif method == "dirichlet":
        if alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        shares = _dirichlet_shares(records, n_clients, alpha, key, rng)
    else:
        raise DataError(f'unknown partition method "{method}"; use "iid" or "dirichlet"')
    return [[records[i] for i in sorted(share)] for share in shares]


def _dirichlet_shares(
    records: Sequence[dict[str, str]], n_clients: int, alpha: float, key: str, rng: np.random.Generator
) -> list[list[int]]:
    by_value = {}  # value of record[key] -> indices of its records
    for i, r in enumerate(records):
        if key not in r:
            raise DataError(f'record {i + 1}: field "{key}" is missing, and the dirichlet partition needs it')
        by_value.setdefault(r[key], []).append(i)
    shares = [[] for _ in range(n_clients)]
    for value in sorted(by_value, key=str):
        idx = rng.permutation(by_value[value])
        p = rng.dirichlet(alpha * np.ones(n_clients))  # (n_clients,), sums to 1
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            shares[k] += part.tolist()
    # a client without data cannot train; n_clients <= len(records) means a donor has >= 2 records
    for k in range(n_clients):
        if not shares[k]:
            donor = max(range(n_clients), key=lambda j: len(shares[j]))
            shares[k].append(shares[donor].pop())
    return shares


# ----------------------------------------------------------------------------- demo data

CLIENTS = ("fr", "de", "es", "it")
TRANSLATE = {  # English word -> the client's word, in CLIENTS order
    "cat": ("chat", "Katze", "gato", "gatto"),
    "dog": ("chien", "Hund", "perro", "cane"),
    "bread": ("pain", "Brot", "pan", "pane"),
    "water": ("eau", "Wasser", "agua", "acqua"),
    "sun": ("soleil", "Sonne", "sol", "sole"),
    "apple": ("pomme", "Apfel", "manzana", "mela"),
    "horse": ("cheval", "Pferd", "caballo", "cavallo"),
    "fish": ("poisson", "Fisch", "pez", "pesce"),
    "milk": ("lait", "Milch", "leche", "latte"),
    "cheese": ("fromage", "Käse", "queso", "formaggio"),
    "night": ("nuit", "Nacht", "noche", "notte"),
    "window": ("fenêtre", "Fenster", "ventana", "finestra"),
    "door": ("porte", "Tür", "puerta", "porta"),
    "friend": ("ami", "Freund", "amigo", "amico"),
    "flower": ("fleur", "Blume", "flor", "fiore"),
    "bird": ("oiseau", "Vogel", "pájaro", "uccello"),
}
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "new"),
    ("open", "closed"),
    ("full", "empty"),
    ("wet", "dry"),
    ("near", "far"),
]
KINDS = {
    "animal": ("lion", "cow", "sheep", "rabbit"),
    "fruit": ("banana", "cherry", "lemon", "peach"),
    "tool": ("hammer", "saw", "drill", "shovel"),
    "vehicle": ("bus", "truck", "boat", "plane"),
}
MOODS = {"positive": ("great", "lovely", "wonderful", "perfect"), "negative": ("awful", "terrible", "boring", "bad")}
REVIEWS = ("The {noun} was {adj}.", "I found the {noun} {adj}.")
NOUNS = ("food", "movie", "hotel", "service", "book", "music", "room", "trip")
# "{}" takes the word; a template without it gets the text in the input field
TEMPLATES = {
    "translate": (
        "Translate into our language: {}",
        "How do we say {}?",
        "Our word for {}?",
        "In our language, {} is?",
        "Say {} in our language.",
        "What do we call {}?",
    ),
    "opposite": ("What is the opposite of {}?", "Opposite of {}?", "Give the opposite of the word {}."),
    "kind": ("What kind of thing is {}?", "Is {} an animal, a fruit, a tool or a vehicle?", "Classify: {}"),
    "sentiment": (
        "Is this review positive or negative?",
        "Classify the sentiment of this review.",
        "Review: {} Positive or negative?",
    ),
}
# records of each shared category per client: each client leans to one category (non-IID)
MIX = {
    "fr": {"opposite": 48, "kind": 24, "sentiment": 24},
    "de": {"opposite": 24, "kind": 48, "sentiment": 24},
    "es": {"opposite": 24, "kind": 24, "sentiment": 48},
    "it": {"opposite": 32, "kind": 32, "sentiment": 32},
}


def _shared_facts(category: str) -> list[tuple[str, str]]:
    """(key, answer) pairs of a shared task: the same answer on every client."""
    if category == "opposite":
        return [(a, b) for a, b in OPPOSITES] + [(b, a) for a, b in OPPOSITES]
    table = KINDS if category == "kind" else MOODS
    return [(word, answer) for answer, words in table.items() for word in words]


def _demo_record(category: str, template: str, text: str, output: str, client: str | None = None) -> dict[str, str]:
    instruction, input = (template.format(text), "") if "{}" in template else (template, text)
    record = {"instruction": instruction, "input": input, "output": output, "category": category}
    return record if client is None else {**record, "client": client}


def _demo_client(rng: random.Random, c: int) -> list[dict[str, str]]:
    client = CLIENTS[c]
    records = [
        _demo_record("translate", t, word, words[c], client)  # every word in every phrasing
        for word, words in TRANSLATE.items()
        for t in TEMPLATES["translate"]
    ]
    for category, n in MIX[client].items():
        facts = _shared_facts(category)
        for i in range(n):
            if i % len(facts) == 0:
                rng.shuffle(facts)  # use every fact once before any repeats
            text, output = facts[i % len(facts)]
            if category == "sentiment":
                text = rng.choice(REVIEWS).format(noun=rng.choice(NOUNS), adj=text)
            records.append(_demo_record(category, rng.choice(TEMPLATES[category]), text, output, client))
    rng.shuffle(records)
    return records


def _demo_single(rng: random.Random, sentiment_per_adjective: int = 12) -> list[dict[str, str]]:
    """The single-model demo: every fact of the shared tasks in every phrasing, and fr's translations.

    Nothing conflicts and nothing repeats: each (instruction, input) appears once, so a record held out
    for eval asks a fact the model saw only in other phrasings (held-out, not memorised).
    """
    records = [
        _demo_record("translate", t, word, words[0])  # one language: "our language" is fr here
        for word, words in TRANSLATE.items()
        for t in TEMPLATES["translate"]
    ]
    for category in ("opposite", "kind"):
        records += [
            _demo_record(category, t, text, output)
            for text, output in _shared_facts(category)
            for t in TEMPLATES[category]
        ]
    reviews = [(noun, review, t) for noun in NOUNS for review in REVIEWS for t in TEMPLATES["sentiment"]]
    for adjective, output in _shared_facts("sentiment"):
        for noun, review, t in rng.sample(reviews, sentiment_per_adjective):  # distinct reviews per adjective
            records.append(_demo_record("sentiment", t, review.format(noun=noun, adj=adjective), output))
    rng.shuffle(records)
    return records


def make_demo(out_dir: str | os.PathLike[str] = "data", seed: int = 0) -> list[dict[str, str]]:
    """Write the demos: out_dir/demo.json (one model) and out_dir/clients/<client>.json (federated).

    Shared categories, with the same answer on every client: "opposite" (hot -> cold), "kind"
    (lion -> animal) and "sentiment" (a templated review, sometimes in the input field -> positive).
    Conflict category, "translate": the SAME instruction ("Translate into our language: cat") wants a
    different answer on each client (chat, Katze, gato, gatto), so one averaged model cannot satisfy all
    clients. Every client has all 96 translate records (half its data) and leans to one shared category
    (see MIX).
    demo.json, for train.py, has no conflict: the shared categories and fr's translations, each fact in
    every phrasing once (_demo_single). One model can answer all of it, also records it never saw.
    Answers come from small closed vocabularies, each fact several times, so a tiny model can learn them.
    Returns the records of demo.json.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "clients"), exist_ok=True)
    for c, client in enumerate(CLIENTS):
        _write_json(os.path.join(out_dir, "clients", f"{client}.json"), _demo_client(rng, c))
    single = _demo_single(random.Random(f"single:{seed}"))  # its own generator: the client files stay as they were
    _write_json(os.path.join(out_dir, "demo.json"), single)
    return single


def _write_json(path: str, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(records, indent=1, ensure_ascii=False) + "\n")  # pretty, and diffs well


def demo_texts(out_dir: str | os.PathLike[str] = "data") -> list[str]:
    """All instruction, input and output strings of the clients' files (to train the tiny model's tokenizer).

    demo.json draws on the same words and phrasings, so its texts add nothing the tokenizer needs.
    """
    records = [r for c in CLIENTS for r in load_records(os.path.join(out_dir, "clients", f"{c}.json"))]
    return [text for r in records for text in (r["instruction"], r["input"], r["output"]) if text]


if __name__ == "__main__":
    # python data.py: regenerate the committed demo files next to this script
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    records = make_demo(out_dir)
    print(f"wrote {out_dir}/demo.json ({len(records)} records) and the files of {len(CLIENTS)} clients")
