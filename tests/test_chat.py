"""Multi-turn chat data: OpenAI `messages` and ShareGPT `conversations` records, the trained spans under
five public chat templates (written here as jinja strings), against transformers' own assistant mask,
and through train.py, infer.py, federated.py and flower_app.py's site on the tiny model."""

import copy
import importlib.util
import json
import os
import types
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import config
import data
import evaluation
import federated
import infer
import lora
import train
from conftest import run_main
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
CHAT_DEMO = os.path.join(ROOT, "data", "chat_demo.json")
_spec = importlib.util.spec_from_file_location("make_demo", os.path.join(ROOT, "data", "make_demo.py"))
make_demo = importlib.util.module_from_spec(_spec)  # the demo generator, a script beside the files it writes
_spec.loader.exec_module(make_demo)

# The templates, after the public ones (minus tools and other extras we do not use).
QWEN25 = (  # ChatML with Qwen2.5's default system message
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] != 'system' %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3 = (
    "{%- for m in messages %}{%- if loop.first %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
GEMMA = (  # no system role: the system message opens the first user turn
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set prefix = messages[0]['content'] + '\n\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)
MISTRAL = (  # [INST]: the system message opens the first instruction; no generation prompt of its own
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\n\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
PHI3 = (  # a finished conversation ends with the eos token, after the last <|end|>
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Mistral v0.3's habit: the system message goes before the LAST instruction, so an earlier turn's text
# changes when a turn is added: its labels could not be trusted, and the record is refused
REWRITES = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set turns = messages[1:] if system else messages %}{%- set ns = namespace(last=-1) %}"
    "{%- for m in turns %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in turns %}{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' + (system + '\n\n' if system and loop.index0 == ns.last else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
           "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # fmt: skip
# name: (template, bos, eos, what closes an assistant turn, what closes the last one)
TEMPLATES = {
    "qwen2.5": (QWEN25, None, "<|im_end|>", "<|im_end|>\n", "<|im_end|>\n"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", "<end_of_turn>\n", "<end_of_turn>\n"),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>", "</s>"),
    "phi3": (PHI3, None, "<|endoftext|>", "<|end|>\n", "<|end|>\n<|endoftext|>"),
}
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the opposite of hot?"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "And of big?"},
    {"role": "assistant", "content": "small"},
]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on the demo texts, with every template's special tokens."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    t.train_from_iterator(data.demo_texts(os.path.join(ROOT, "data")), trainer)
    return t


def make_tok(bpe, template, bos=None, eos="<|endoftext|>", pad="<|endoftext|>", bos_on_encode=False):
    t = copy.deepcopy(bpe)
    if bos_on_encode:  # as Llama's tokenizers: tok(text) starts with BOS unless add_special_tokens=False
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template
    )


def trained_text(tok, example):
    return tok.decode([t for t in example["labels"] if t != -100])


# ----------------------------------------------------------------------------- the trained spans


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_trained_tokens_under_each_template(name, bpe):
    template, bos, eos, close, last_close = TEMPLATES[name]
    tok = make_tok(bpe, template, bos, eos)
    record = {"messages": CONVERSATION}
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    ex = data.tokenize_example(tok, record, train_on="assistant")
    assert tok.decode(ex["input_ids"]) == full  # the pieces, encoded one by one, are the whole text
    assert trained_text(tok, ex) == "cold" + close + "small" + last_close
    assert trained_text(tok, data.tokenize_example(tok, record, train_on="last")) == "small" + last_close
    everything = data.tokenize_example(tok, record, train_on="all")
    assert everything["labels"] == everything["input_ids"] == ex["input_ids"]
    # the system message (and Qwen2.5's default one), the user turns and the role headers are never trained
    default = data.tokenize_example(tok, {"messages": CONVERSATION[1:]})
    assert trained_text(tok, default) == "cold" + close + "small" + last_close
    if name == "qwen2.5":
        assert "You are Qwen" in tok.decode(default["input_ids"])
    # the prompt an eval answers the last turn from: the example's ids up to the last trained span
    prompt = data.prompt_ids(tok, record)
    assert ex["input_ids"][: len(prompt)] == prompt and ex["labels"][len(prompt)] != -100
    assert all(label == -100 for label in ex["labels"][len(prompt) - 3 : len(prompt)])
    assert tok.decode(prompt) == tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template, close", [
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
     "{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
     "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}", "<|im_end|>\n"),
    (LLAMA3.replace("{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + "
                    "'<|eot_id|>' }}",
                    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
                    "{%- if m['role'] == 'assistant' %}"
                    "{% generation %}{{- m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
                    "{%- else %}{{- m['content'] | trim + '<|eot_id|>' }}{%- endif %}"), "<|eot_id|>"),
])  # fmt: skip
def test_spans_agree_with_the_assistant_mask_of_generation_markers(template, close, bpe):
    """transformers marks the tokens between {% generation %} and {% endgeneration %}: our spans, found
    without the markers, must be the same tokens."""
    assert "generation %}" in template
    tok = make_tok(bpe, template, "<|begin_of_text|>", "<|eot_id|>" if "eot" in close else "<|im_end|>")
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ex = data.tokenize_example(tok, {"messages": CONVERSATION})
    assert ex["input_ids"] == out["input_ids"]
    assert [label != -100 for label in ex["labels"]] == [bool(m) for m in out["assistant_masks"]]
    assert trained_text(tok, ex) == "cold" + close + "small" + close


def test_pad_equal_to_eos_keeps_every_end_of_turn_trained(bpe):
    """Llama 3 and SmolLM2 pad with their EOS: masking by `id == pad_id` would drop every <|eot_id|>."""
    tok = make_tok(bpe, LLAMA3, "<|begin_of_text|>", "<|eot_id|>", pad="<|eot_id|>")
    assert tok.pad_token_id == tok.eos_token_id
    short = data.tokenize_example(tok, {"messages": CONVERSATION[1:3]})
    long = data.tokenize_example(tok, {"messages": CONVERSATION})
    batch = data.collate([short, long], tok.pad_token_id)
    eot = tok.eos_token_id
    for i, ex in enumerate((short, long)):
        n = len(ex["input_ids"])
        trained_eot = (batch["labels"][i, :n] == eot).sum().item()
        assert trained_eot == i + 1 and ex["input_ids"].count(eot) == [2, 5][i]  # the assistant turns' alone
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == eot).all()
    assert trained_text(tok, long).count("<|eot_id|>") == 2


def test_no_second_bos(bpe):
    """The template writes BOS; the pieces are encoded without adding another."""
    tok = make_tok(bpe, LLAMA3, "<|begin_of_text|>", "<|eot_id|>", bos_on_encode=True)
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # encoding with special tokens would add a second one
    for record in ({"messages": CONVERSATION}, {"instruction": "Opposite of hot?", "input": "", "output": "cold"}):
        ids = data.tokenize_example(tok, record)["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1
        assert data.prompt_ids(tok, record).count(bos) == 1


def test_a_template_that_rewrites_earlier_turns_is_refused(bpe, tmp_path):
    tok = make_tok(bpe, REWRITES, "<s>", "</s>")
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (CONVERSATION[1:], CONVERSATION)) + "\n")
    records = data.load_records(path)
    assert len(data.tokenize_records(tok, records[:1], 64)) == 1  # without a system message it is consistent
    with pytest.raises(DataError) as e:
        data.tokenize_records(tok, records, 64)
    assert str(e.value).startswith(
        f"{path}, line 2: the chat template renders the conversation before assistant turn 1 "
    )


def test_a_template_error_names_the_record(bpe, tmp_path):
    tok = make_tok(bpe, GEMMA, "<bos>", "<eos>")
    path = tmp_path / "chat.json"
    bad = [CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]]  # two user turns in a row: Gemma refuses
    path.write_text(json.dumps([{"messages": CONVERSATION}, {"messages": bad}]))
    with pytest.raises(DataError, match=rf"^{path}, record 2: Conversation roles must alternate"):
        data.tokenize_records(tok, data.load_records(path), 64)


def test_alpaca_template_for_several_turns(bpe):
    """No chat template: the Alpaca template, continued turn after turn (data.render_alpaca)."""
    tok = make_tok(bpe, None, None, "<|endoftext|>")
    ex = data.tokenize_example(tok, {"messages": CONVERSATION})
    assert tok.decode(ex["input_ids"]) == (
        "Answer in one word.\n\n### Instruction:\nWhat is the opposite of hot?\n\n### Response:\ncold<|endoftext|>"
        "\n\n### Instruction:\nAnd of big?\n\n### Response:\nsmall<|endoftext|>"
    )
    assert trained_text(tok, ex) == "cold<|endoftext|>small<|endoftext|>"
    assert tok.decode(data.prompt_ids(tok, {"messages": CONVERSATION[1:]})).startswith(data.ALPACA_PREAMBLE + "\n\n")
    # a one-turn conversation is an Alpaca record without input, token for token
    one = {"messages": [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "cold"}]}
    assert data.tokenize_example(tok, one) == data.tokenize_example(
        tok, {"instruction": "Opposite of hot?", "output": "cold"}
    )


def test_long_conversations_are_cut_and_those_left_untrained_dropped(bpe, capsys):
    tok = make_tok(bpe, QWEN25.replace("You are Qwen", "Q"), None, "<|im_end|>")
    record = {"messages": CONVERSATION}
    whole = data.tokenize_example(tok, record)
    first = whole["labels"].index(next(t for t in whole["labels"] if t != -100))
    cut = data.tokenize_example(tok, record, max_seq_len=first + 1)
    assert cut["input_ids"] == whole["input_ids"][: first + 1] and cut["labels"][-1] != -100
    assert data.tokenize_example(tok, record, max_seq_len=first) is None
    # "last": the final answer is far in; a cut before it leaves nothing trained
    assert data.tokenize_example(tok, record, max_seq_len=len(whole["input_ids"]) - 1, train_on="last") is not None
    assert data.tokenize_example(tok, record, max_seq_len=first + 5, train_on="last") is None
    kept = data.tokenize_records(tok, [record, record], first + 5, train_on="last", name="eval")
    assert (
        kept == []
        and "eval: dropped 2 of 2 examples with no trained token within max_seq_len" in capsys.readouterr().err
    )


# ----------------------------------------------------------------------------- files


def test_sharegpt_and_messages_files_give_identical_examples(bpe, tmp_path):
    tok = make_tok(bpe, QWEN25, None, "<|im_end|>")
    convs = [CONVERSATION, CONVERSATION[1:3]]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"id": str(i), "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
                for i, c in enumerate(convs)]  # fmt: skip
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    (tmp_path / "openai.jsonl").write_text(
        "\n".join(json.dumps({"id": str(i), "messages": c}) for i, c in enumerate(convs))
    )
    a, b = data.load_records(tmp_path / "sharegpt.json"), data.load_records(tmp_path / "openai.jsonl")
    assert [r["messages"] for r in a] == [r["messages"] for r in b] == convs and a[1]["id"] == "1"
    assert data.tokenize_records(tok, a, 256) == data.tokenize_records(tok, b, 256)


def test_field_map_renames_lists_keys_and_roles(tmp_path):
    path = tmp_path / "dialog.jsonl"
    turns = [
        {"speaker": "client", "text": "Hi"},
        {"speaker": "bot", "text": "Hello"},
        {"speaker": "client", "text": "?"},
    ]
    path.write_text(json.dumps({"dialog": turns, "source": "web"}) + "\n")
    fm = {"messages": "dialog", "role": "speaker", "content": "text", "roles": {"client": "user", "bot": "assistant"}}
    (record,) = data.load_records(path, fm)
    # the trailing user turn has no answer to train: the conversation ends at its last assistant turn
    assert record["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert record["source"] == "web" and data.reference(record) == "Hello"
    with pytest.raises(DataError, match="field_map.roles: expected"):
        data.load_records(path, {**fm, "roles": {"bot": "robot"}})


def test_sharegpt_roles_found_in_the_wild(tmp_path):
    path = tmp_path / "sharegpt.json"
    turns = [{"from": f, "value": "x"} for f in ("system", "human", "chatgpt", "user", "bing", "human", "bard")]
    path.write_text(json.dumps([{"conversations": turns}]))
    roles = [m["role"] for m in data.load_records(path)[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]


BAD_FILES = [
    ([{"messages": CONVERSATION[1:3]}, {"instruction": "a", "output": "b"}],
     "record 2: Alpaca format, but record 1 is OpenAI messages; one format per file"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, {"messages": CONVERSATION}],
     "record 2: OpenAI messages format, but record 1 is ShareGPT conversations; one format per file"),
    ([{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     'record 1, message 1: unknown role "tool"; known: system, user, assistant, human, gpt'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]}],
     'record 1, message 2: field "value" is empty'),
    ([{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}],
     "record 1: no assistant turn, so nothing to train on"),
    ([{"messages": []}], 'record 1: field "messages" must be a non-empty list of messages'),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
     'record 1, message 1: field "content" missing'),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}],
     "record 1, message 2: a system message after the first turn"),
]  # fmt: skip


@pytest.mark.parametrize("records, message", BAD_FILES)
def test_bad_chat_files_give_one_line_and_write_nothing(records, message, cache_dir, tmp_path, capsys):
    path, out = tmp_path / "chat.json", tmp_path / "run"
    path.write_text(json.dumps(records))
    argv = [CONFIG, f"model.cache_dir={cache_dir}", f"data.train_file={path}", f"train.output_dir={out}"]
    code, _, err = run_main(train.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}, {message}"), err
    assert not out.exists()


def test_train_on_prompt_is_refused_with_the_new_key(tmp_path):
    with pytest.raises(
        config.ConfigError, match="data.train_on_prompt was replaced by data.train_on: true is train_on=all"
    ):
        config.load_config(CONFIG, ["data.train_on_prompt=true"])
    assert config.load_config(CONFIG, ["data.train_on=last"])["data"]["train_on"] == "last"
    with pytest.raises(config.ConfigError, match="data.train_on: 'prompt' is not one of assistant, last, all"):
        config.load_config(CONFIG, ["data.train_on=prompt"])


# ----------------------------------------------------------------------------- the chat demo and the entry scripts


def test_chat_demo_matches_its_generator_and_needs_the_history(tmp_path):
    records = make_demo.make_chat_demo(tmp_path)
    assert (tmp_path / "chat_demo.json").read_bytes() == open(CHAT_DEMO, "rb").read(), "run python data/make_demo.py"
    loaded = data.load_records(CHAT_DEMO)
    assert [{k: v for k, v in r.items() if k != "_where"} for r in loaded] == records
    answers = {}  # the last question alone -> its answers
    for r in records:
        answers.setdefault(r["messages"][-2]["content"], set()).add(r["messages"][-1]["content"])
    assert len(answers) == 16 * 6 and all(len(a) == 4 for a in answers.values())  # one per language
    assert len(records) == 2 * 4 * 16 * 6  # each (language, word, phrasing) twice
    assert {len(r["messages"]) for r in records} == {4, 6}  # the language one or two exchanges back


def test_conversations_train_and_evaluate_on_the_last_turn(cache_dir, tmp_path, capsys, monkeypatch):
    """train.py on the chat demo: the eval answers each held-out conversation's last turn from its history,
    as infer.py --input does."""
    asked = []
    real = evaluation.predict

    def spy(model, tok, records, *a, **k):
        asked.append([data.prompt_ids(tok, r) for r in records])
        return real(model, tok, records, *a, **k)

    monkeypatch.setattr(evaluation, "predict", spy)
    out = tmp_path / "run"
    argv = [CONFIG, f"model.cache_dir={cache_dir}", f"data.train_file={CHAT_DEMO}", f"train.output_dir={out}",
            "train.max_steps=2", "train.eval_every=0", "train.batch_size=8", "train.eval_max_new_tokens=4",
            "data.eval_fraction=0.01"]  # fmt: skip
    code, stdout, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "760 train / 8 eval examples" in stdout and len(asked) == 2 and len(asked[0]) == 8
    tok = config.load_base(config.load_config(CONFIG, [f"model.cache_dir={cache_dir}"]))[1]
    train_recs, eval_recs = data.split_eval(data.load_records(CHAT_DEMO), 0.01, 0)
    for ids, r in zip(asked[0], eval_recs, strict=True):  # everything but the last answer, as trained
        text = tok.decode(ids)
        assert text.endswith("<|im_start|>assistant\n") and r["messages"][-2]["content"] in text
        assert r["messages"][0]["content"] in text and not text.endswith(r["messages"][-1]["content"])
    # infer.py --input on the same conversations: one row per record, scored against the last answer
    preds = tmp_path / "preds.jsonl"
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"messages": r["messages"]} for r in eval_recs]))
    argv = [CONFIG, f"model.cache_dir={cache_dir}", "--adapter", str(out / "adapter"), "--input", str(eval_file),
            "--output", str(preds), "--max-new-tokens", "4"]  # fmt: skip
    code, stdout, err = run_main(infer.main, argv, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [row["messages"] for row in rows] == [r["messages"][:-1] for r in eval_recs]
    assert [row["reference"] for row in rows] == [r["messages"][-1]["content"] for r in eval_recs]
    keys = {"messages", "reference", "prediction", "exact_match", "rouge_l", "contains"}
    assert all(set(row) == keys for row in rows)


def test_federated_clients_from_conversation_files_and_a_dirichlet_split(cache_dir, tmp_path, capsys):
    records = json.load(open(CHAT_DEMO))
    files = []
    for lang in ("fr", "de"):
        path = tmp_path / f"{lang}.json"
        path.write_text(json.dumps([r for r in records if r["category"] == lang][:40]))
        files.append(str(path))
    common = [CONFIG, f"model.cache_dir={cache_dir}", "federated.rounds=1", "federated.local_steps=1",
              "federated.global_steps=1", "federated.max_new_tokens=2", "train.batch_size=4"]  # fmt: skip
    out = tmp_path / "files"
    code, stdout, err = run_main(
        federated.main, [*common, f"federated.output_dir={out}", f"data.clients=[{','.join(files)}]"], capsys
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows if "client" in r} == {"fr", "de"}
    assert all(r["n"] == 4 for r in rows if "client" in r)  # 10% of 40 held out per client
    # one file, split by the top-level "category" field of each conversation
    out = tmp_path / "dirichlet"
    argv = [*common, f"federated.output_dir={out}", "data.clients=null", f"data.train_file={CHAT_DEMO}",
            "data.partition=dirichlet", "data.dirichlet_alpha=0.1", "data.num_clients=3",
            "data.eval_fraction=0.02"]  # fmt: skip
    code, stdout, err = run_main(federated.main, argv, capsys)
    assert code == 0, err
    parts = data.partition(data.load_records(CHAT_DEMO), 3, "dirichlet", 0.1, 0, "category")
    dominant = [max(Counter(r["category"] for r in p).values()) / len(p) for p in parts]  # iid: about 1/4
    assert sum(len(p) for p in parts) == 768 and sum(dominant) / 3 > 0.6, dominant
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows if "client" in r} == {"client_0", "client_1", "client_2"}


def test_a_flower_site_takes_a_conversation_file(cache_dir, tmp_path):
    flower_app = pytest.importorskip("flower_app")
    overrides = f"model.cache_dir={cache_dir} train.batch_size=4 federated.max_new_tokens=2 data.eval_fraction=0.02"
    node = {"client": "chat", "data-file": CHAT_DEMO, "state-dir": str(tmp_path)}
    context = types.SimpleNamespace(run_id=7, run_config={"overrides": overrides}, node_config=node)
    client = flower_app.site(context).setup(7, flower_app.load_run_config(context.run_config))
    assert "messages" in client.records[0][0] and len(client.examples[1]) == 15
    rows = client.evaluate(lora.adapter_state_dict(client.model, "global"))  # the fresh global adapter
    assert set(rows) == {"global", "local", "global+local"} and all(r["n"] == 15 for r in rows.values())
    assert torch.isfinite(torch.tensor([r["eval_loss"] for r in rows.values()])).all()
