r"""Instruction and chat data for causal-LM fine-tuning: load, render, tokenize, batch, split and partition.

Three record formats, JSON list (.json) or JSON lines (.jsonl), detected per file (one format a file):

    Alpaca   {"instruction": "...", "input": "..." (optional), "output": "..."}
    OpenAI   {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    ShareGPT {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}

plus optional top-level fields ("category", "client": the federated demo's). field_map reads other column
and role names. An Alpaca record is a one-turn conversation: user = instruction (+ "\n\n" + input),
assistant = output. Every record becomes a list of messages and is rendered by the tokenizer's own chat
template (or, without one, by the Alpaca template, render_alpaca), then cut into pieces:

    segments(tok, messages) -> [(text, False), (text, True), (text, False), (text, True), ...]

A True piece is what an assistant turn adds to the text: its content and whatever the template closes
the turn with (ChatML `<|im_end|>\n`, Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>\n`, Mistral `</s>`).
It is found without template-specific code, by rendering the conversation prefix by prefix:

    before = render(messages[:i], add_generation_prompt=True)   # up to where turn i's answer begins
    through = render(messages[:i + 1])                          # ... and with turn i
    full = render(messages)                                     # must start with every `before`

Turn i's piece is where `through` and `full` agree after `before` (a template may close a finished
conversation with an extra token, e.g. Phi-3's eos). A template that renders earlier turns differently once
later turns follow is refused: its labels could not be trusted. Each piece is encoded on its own
(add_special_tokens=False: the template already wrote any BOS), so piece boundaries are token boundaries,
and the ids of everything before the last answer are the very ids that generation starts from:

    input_ids = encode(piece 0) + encode(piece 1) + ...
    labels    = the ids of the trained pieces, -100 elsewhere    (data.train_on: assistant | last | all)

-100 is the ignore_index of F.cross_entropy: those positions add nothing to the loss. Labels come from
the pieces alone, never from comparing ids with the pad id (a pad token equal to EOS, as in Llama 3 and
SmolLM2, would otherwise mask the end of every turn and the model would never learn to stop). labels are
aligned with input_ids; the loss shifts them by one (logits[:, :-1] predict labels[:, 1:]).
"""

import bisect
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
FIELDS = ("instruction", "input", "output", "category", "client")  # an Alpaca record's
REQUIRED = ("instruction", "output")
ROLES = ("system", "user", "assistant")
# field_map's keys beyond FIELDS: the lists' names, the message keys of each format, and extra role names
CHAT_FIELDS = ("messages", "conversations", "role", "content", "from", "value")
ROLE_NAMES = {  # a file's role name -> ours; ShareGPT's, and those of other chat logs found in the wild
    **{r: r for r in ROLES},
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
TRAIN_ON = ("assistant", "last", "all")
FORMAT_NAMES = {"alpaca": "Alpaca", "messages": "OpenAI messages", "conversations": "ShareGPT conversations"}

Record = dict[str, Any]  # an Alpaca record's strings, or {"messages": [...]} plus top-level fields
Example = dict[str, list[int]]  # one tokenized record: input_ids, labels
Batch = dict[str, torch.Tensor]  # input_ids, labels, and attention_mask (padded) or position_ids (packed): (B, T)


class DataError(ValueError):
    """Bad input data; the message names the file and the record, line or field."""


# ----------------------------------------------------------------------------- loading


def load_records(path: str | os.PathLike[str], field_map: Mapping[str, Any] | None = None) -> list[Record]:
    """Read Alpaca, OpenAI-messages or ShareGPT records from a JSON list or a JSON-lines file.

    Args:
        path: a .json file holding a list of objects, or a .jsonl file with one object per line
            (a .json file whose lines are each an object is read as JSON lines too).
        field_map: our name -> the file's, e.g. Dolly's {"input": "context", "output": "response"}, or
            {"messages": "dialog"}; "roles" maps role names, e.g. {"roles": {"bot": "assistant"}}.
    Returns:
        Alpaca: dicts with keys instruction, input ("" if absent), output, and category, client where
        present. Chat: {"messages": [{"role", "content"}, ...]} ending with an assistant turn, plus the
        record's other top-level strings and numbers. Each also has "_where" (file and record number).
    Raises:
        DataError: naming the file and the record (counted from 1) or line.
    """
    path = str(path)
    field_map = dict(field_map or {})
    roles = field_map.pop("roles", None) or {}
    unknown = sorted(set(field_map) - set(FIELDS) - set(CHAT_FIELDS))
    if unknown:
        known = ", ".join((*FIELDS, *CHAT_FIELDS, "roles"))
        raise DataError(f"field_map: unknown field {unknown[0]!r}; known fields: {known}")
    if not isinstance(roles, dict) or any(r not in ROLES for r in roles.values()):
        raise DataError(f"field_map.roles: expected {{file's role: {' | '.join(ROLES)}}}, got {roles!r}")
    names = {**{f: f for f in (*FIELDS, *CHAT_FIELDS)}, **field_map}  # our name -> the file's name
    role_names = {**ROLE_NAMES, **roles}
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
    records, first = [], None  # first: (format, place) of the first record
    for place, obj in raw:
        where = f"{path}, {place}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type(obj)}")
        kind = next((k for k in ("messages", "conversations") if names[k] in obj), "alpaca")
        first = first or (kind, place)
        if kind != first[0]:
            raise DataError(
                f"{where}: {FORMAT_NAMES[kind]} format, but {first[1]} is {FORMAT_NAMES[first[0]]}; one format per file"
            )
        record = (
            _normalise(obj, where, names) if kind == "alpaca" else _conversation(obj, where, kind, names, role_names)
        )
        records.append({**record, "_where": where})
    return records


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


def _normalise(obj: dict, where: str, names: dict[str, str]) -> dict[str, str]:
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


def _conversation(obj: dict, where: str, kind: str, names: dict[str, str], role_names: dict[str, str]) -> Record:
    """{"messages": [...]} up to the last assistant turn (later turns have nothing to train), plus the
    record's other top-level scalar fields (a partition key, say)."""
    turns, (role_key, content_key) = (
        obj[names[kind]],
        ((names["role"], names["content"]) if kind == "messages" else (names["from"], names["value"])),
    )
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: field "{names[kind]}" must be a non-empty list of messages')
    messages = []
    for k, m in enumerate(turns, start=1):
        at = f"{where}, message {k}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected a JSON object, got {_type(m)}")
        for key in (role_key, content_key):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"must be a string, got {_type(m[key])}"
                raise DataError(f'{at}: field "{key}" {got}')
        if m[role_key] not in role_names:
            raise DataError(
                f'{at}: unknown role "{m[role_key]}"; known: {", ".join(role_names)} (data.field_map.roles maps others)'
            )
        role = role_names[m[role_key]]
        if not m[content_key].strip():
            raise DataError(f'{at}: field "{content_key}" is empty')
        if role == "system" and k > 1:
            raise DataError(f"{at}: a system message after the first turn")
        messages.append({"role": role, "content": m[content_key]})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    extra = {k: v for k, v in obj.items() if k != names[kind] and isinstance(v, (str, int, float, bool))}
    return {**extra, "messages": messages[: last + 1]}


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- messages and rendering

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


def to_messages(record: Record, system_prompt: str | None = None, chat_template: bool = True) -> list[dict[str, str]]:
    """The record as chat messages; system_prompt goes first unless the record has a system message.

    An Alpaca record is one exchange, user = instruction + "\n\n" + input. Without a chat template
    (chat_template False) it keeps the Alpaca template's own "### Input:" section and preamble.
    """
    if "messages" in record:
        messages = record["messages"]
        has_system = messages[0]["role"] == "system"
        return (
            messages if has_system or not system_prompt else [{"role": "system", "content": system_prompt}, *messages]
        )
    instruction, input = record["instruction"], record.get("input", "")
    if chat_template:
        system, user = system_prompt, instruction + ("\n\n" + input if input else "")
    else:
        system = system_prompt or (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)
        user = instruction + ("\n\n### Input:\n" + input if input else "")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if "output" in record:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def render_alpaca(messages: Sequence[dict[str, str]], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """The Alpaca template, for tokenizers without a chat template; several turns continue it:

    {bos}{system, or the Alpaca preamble}\n\n### Instruction:\n{user}\n\n### Response:\n{assistant}{eos}
    \n\n### Instruction:\n{user}\n\n### Response:\n{assistant}{eos} ...

    We write the BOS ourselves, for models that expect one (Llama); the EOS ends each answer.
    """
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    text = bos + (system or ALPACA_PREAMBLE) + "\n\n"
    for i, m in enumerate(turns):
        if m["role"] == "user":
            text += ("\n\n" if i else "") + f"### Instruction:\n{m['content']}\n\n"
        else:
            text += f"### Response:\n{m['content']}{eos}"
    return text + ("### Response:\n" if add_generation_prompt else "")


def render(
    tokenizer: "PreTrainedTokenizerBase", messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """The messages as text: the tokenizer's chat template, else render_alpaca."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token, which ends every response of the Alpaca template")
    return render_alpaca(messages, add_generation_prompt, tokenizer.bos_token or "", tokenizer.eos_token)


def render_prompt(
    tokenizer: "PreTrainedTokenizerBase", instruction: str, input: str = "", system_prompt: str | None = None
) -> str:
    """The prompt of a one-turn exchange, up to where the assistant's answer begins (infer.py --prompt)."""
    record = {"instruction": instruction, "input": input}
    return render(tokenizer, to_messages(record, system_prompt, bool(tokenizer.chat_template)), True)


def segments(tokenizer: "PreTrainedTokenizerBase", messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation in consecutive pieces (text, is an assistant turn); see the module doc.

    Raises:
        ValueError: the template renders the text before an assistant turn differently once later
            turns follow, or does not write the turn's content where the turn begins.
    """
    full = render(tokenizer, messages)
    specials = list(tokenizer.get_added_vocab())
    pieces, done, turn = [], 0, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn += 1
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(before) or len(before) < done:
            raise ValueError(
                f"the chat template renders the conversation before assistant turn {turn} differently once "
                "later turns follow (it rewrites earlier turns), so the trained tokens cannot be found"
            )
        through = render(tokenizer, messages[: i + 1])[len(before) :]
        end = _snap(full, len(before) + len(os.path.commonprefix([through, full[len(before) :]])), specials)
        if m["content"].strip() not in full[len(before) : end]:
            raise ValueError(f"the chat template does not write assistant turn {turn} where its answer begins")
        pieces += [(full[done : len(before)], False), (full[len(before) : end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def _snap(text: str, end: int, specials: list[str]) -> int:
    """`end` moved back to the start of any special token it falls inside (`<|` of Phi-3's `<|user|>`
    agrees with `<|` of its eos `<|endoftext|>`: a piece never ends inside a special token)."""
    moved = True
    while moved:
        moved = False
        for s in specials:
            i = text.find(s, max(end - len(s) + 1, 0))
            if 0 <= i < end:
                end, moved = i, True
    return end


def _pieces(
    tokenizer: "PreTrainedTokenizerBase", record: Record, system_prompt: str | None
) -> tuple[list[tuple[str, bool]], int]:
    """(segments of the record as rendered for this tokenizer, the index of its last assistant piece)."""
    pieces = segments(tokenizer, to_messages(record, system_prompt, bool(tokenizer.chat_template)))
    return pieces, max(k for k, (_, is_answer) in enumerate(pieces) if is_answer)


def encode(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Token ids of text as written: special tokens in the text (<|im_start|>) are kept, none are added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(
    tokenizer: "PreTrainedTokenizerBase",
    record: Record,
    max_seq_len: int = 1024,
    system_prompt: str | None = None,
    train_on: str = "assistant",
) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} of one record, cut to max_seq_len; None if no trained token survives the cut.

    train_on: "assistant" (every assistant turn), "last" (the final one) or "all" (every token).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    pieces, last = _pieces(tokenizer, record, system_prompt)
    input_ids, labels = [], []
    for k, (text, is_answer) in enumerate(pieces):
        ids = encode(tokenizer, text)
        trained = train_on == "all" or (is_answer and (train_on == "assistant" or k == last))
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never predicted
        return None  # not one trained token survives the cut: nothing to learn
    return {"input_ids": input_ids, "labels": labels}


def tokenize_records(
    tokenizer: "PreTrainedTokenizerBase",
    records: Iterable[Record],
    max_seq_len: int,
    system_prompt: str | None = None,
    train_on: str = "assistant",
    name: str = "train",
) -> list[dict[str, list[int]]]:
    """tokenize_example over records; reports in one line how many were dropped.

    Raises:
        DataError: a record the chat template cannot render or split into turns, named by its file and place.
    """
    examples = [
        _named(tokenize_example, tokenizer, r, i, name, max_seq_len, system_prompt, train_on)
        for i, r in enumerate(records, 1)
    ]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        print(
            f"warning: {name}: dropped {len(examples) - len(kept)} of {len(examples)} examples with no trained "
            f"token within max_seq_len={max_seq_len}",
            file=sys.stderr,
        )
    return kept


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", record: Record, system_prompt: str | None = None) -> list[int]:
    """The ids the record's last assistant turn is answered from (everything before it), as in training."""
    pieces, last = _pieces(tokenizer, record, system_prompt)
    return [i for text, _ in pieces[:last] for i in encode(tokenizer, text)]


def prompts(
    tokenizer: "PreTrainedTokenizerBase", records: Iterable[Record], system_prompt: str | None = None
) -> list[list[int]]:
    """prompt_ids of each record.

    Raises:
        DataError: a record the chat template cannot render or split into turns, named by its file and place.
    """
    return [_named(prompt_ids, tokenizer, r, i, "prompts", system_prompt) for i, r in enumerate(records, 1)]


def _named(fn: Any, tokenizer: "PreTrainedTokenizerBase", record: Record, i: int, name: str, *args: Any) -> Any:
    """fn(tokenizer, record, *args), its template errors turned into a DataError naming the record."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2; raise_exception raises this

    try:
        return fn(tokenizer, record, *args)
    except (TemplateError, ValueError) as e:
        raise DataError(f"{record.get('_where', f'{name} record {i}')}: {e}") from None


def reference(record: Record) -> str:
    """The answer a model is scored against: the output, or the last assistant turn's content."""
    return record["messages"][-1]["content"] if "messages" in record else record["output"]


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


def collate_packed(
    examples: Sequence[dict[str, list[int]]], pad_id: int | None, max_len: int | None, multiple_of: int | None = 8
) -> dict[str, torch.Tensor]:
    """The same examples as collate, laid end to end in as few rows as hold them: LongTensors input_ids,
    labels, position_ids, each (R, T), and no attention_mask.

    Rows hold at most max_len tokens (max_len None: one row of them all, for flash_attention_2). The
    number of rows R is what best-fit decreasing packs into max_len (pack); T is then the shortest row
    length that still packs them into R rows, so the rows come out about equally full instead of the
    last one nearly empty. Each example keeps its own positions, 0, 1, 2, ..., and the padding at the
    end of a row starts again at 0. That is how the model tells the examples apart: with no
    attention_mask, transformers reads a restart of position_ids as a boundary and lets no token attend
    across it (a block-diagonal causal mask for sdpa and eager; the varlen kernel's cu_seqlens for
    flash_attention_2, which needs one row). The label of each example's first token becomes -100: it
    would be predicted by the last token of the example before it. Unpacked, that label is shifted out
    of the loss anyway, so both layouts score the same positions with the same labels.
    """
    if pad_id is None:
        raise ValueError("pad_id is None: pass tokenizer.pad_token_id (or eos_token_id if it has no pad token)")
    multiple_of = multiple_of or 1
    lengths = [len(e["input_ids"]) for e in examples]
    limit = max_len or sum(lengths)
    bins = pack(lengths, limit)
    width = -(-max(max(lengths), -(-sum(lengths) // len(bins))) // multiple_of) * multiple_of  # rounded up
    while width < limit:  # the shortest rows that still make do with len(bins) of them
        if len(tighter := pack(lengths, width)) == len(bins):
            bins = tighter
            break
        width += multiple_of
    T = -(-max(sum(lengths[i] for i in b) for b in bins) // multiple_of) * multiple_of
    input_ids = torch.full((len(bins), T), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), T), dtype=torch.long)
    for row, b in enumerate(bins):
        start = 0
        for i in b:
            n, end = lengths[i], start + lengths[i]
            input_ids[row, start:end] = torch.tensor(examples[i]["input_ids"], dtype=torch.long)
            labels[row, start + 1 : end] = torch.tensor(examples[i]["labels"][1:], dtype=torch.long)
            position_ids[row, start:end] = torch.arange(n)
            start = end
        position_ids[row, start:] = torch.arange(T - start)  # the padding: a segment of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins whose lengths add up to at most capacity, by best-fit decreasing:
    longest first, each into the fullest bin with room for it, else into a new bin. Like first-fit
    decreasing it never needs more than about 11/9 of the fewest bins possible (Johnson 1973), and on
    a micro-batch of examples it usually needs the fewest. O(n log n): the bins' free space is kept
    sorted, so that the best fit is a bisection.

    Raises:
        ValueError: a length above capacity.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens cannot be packed into rows of {capacity}")
        k = bisect.bisect_left(free, (n, -1))  # the bin with the least room that still fits n
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


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
# data/make_demo.py writes the demo files; the tiny model's tokenizer is trained on the clients' texts.

DEMO_CLIENTS = ("fr", "de", "es", "it")  # data/clients/<name>.json, in make_demo.py's CLIENTS order


def demo_texts(out_dir: str | os.PathLike[str] = "data") -> list[str]:
    """All instruction, input and output strings of the clients' files (to train the tiny model's tokenizer).

    demo.json draws on the same words and phrasings, so its texts add nothing the tokenizer needs. The
    files are read in DEMO_CLIENTS order: the order of the texts shapes the trained tokenizer.
    """
    records = [r for c in DEMO_CLIENTS for r in load_records(os.path.join(out_dir, "clients", f"{c}.json"))]
    return [text for r in records for text in (r["instruction"], r["input"], r["output"]) if text]
