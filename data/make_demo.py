"""Write the demo data: demo.json (one model), clients/<client>.json (federated) and chat_demo.json.

    python data/make_demo.py          # rewrites the files next to this script, byte for byte as committed

Small closed vocabularies, each fact several times, so that a tiny model learns them in minutes; make_demo
and make_chat_demo say what each file holds. tests/test_data.py and tests/test_chat.py check that the
committed files are what this script writes. Needs the standard library only.
"""

import json
import os
import random
from typing import Any

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


LANGUAGES = ("French", "German", "Spanish", "Italian")  # CLIENTS' languages, in TRANSLATE's order
OPENERS = ("Speak {}.", "In {}, please.", "We speak {}.", "Use {}.")
ACKS = ("Oui.", "Ja.", "Sí.", "Sì.")  # "yes", in each language


def make_chat_demo(out_dir: str | os.PathLike[str] = "data", seed: int = 0) -> list[dict[str, Any]]:
    """Write out_dir/chat_demo.json: conversations whose last answer depends on their first turn.

    The user names a language (French, German, Spanish or Italian; the assistant agrees in it), asks
    for an opposite or not, and finally asks for a word in "our language". The last question alone
    ("How do we say cat?") has four right answers, one per language: only a model that reads the history
    answers it. Every (language, word, phrasing of the question) twice, with other openers and questions
    in between, so a held-out conversation asks what the model saw only in other conversations. OpenAI
    `messages` records, with a "category" (the language) for the federated partition.
    """
    rng = random.Random(f"chat:{seed}")
    opposites = _shared_facts("opposite")
    records = []
    for lang, (language, ack) in enumerate(zip(LANGUAGES, ACKS, strict=True)):
        for word, words in TRANSLATE.items():
            for template in TEMPLATES["translate"] * 2:
                messages = [
                    {"role": "user", "content": rng.choice(OPENERS).format(language)},
                    {"role": "assistant", "content": ack},
                ]
                if rng.random() < 1 / 3:  # a question in between: the language is two turns back
                    text, answer = rng.choice(opposites)
                    messages += [
                        {"role": "user", "content": rng.choice(TEMPLATES["opposite"]).format(text)},
                        {"role": "assistant", "content": answer},
                    ]
                messages += [
                    {"role": "user", "content": template.format(word)},
                    {"role": "assistant", "content": words[lang]},
                ]
                records.append({"messages": messages, "category": CLIENTS[lang]})
    rng.shuffle(records)
    _write_json(os.path.join(out_dir, "chat_demo.json"), records)
    return records


def _write_json(path: str, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(records, indent=1, ensure_ascii=False) + "\n")  # pretty, and diffs well


if __name__ == "__main__":
    out_dir = os.path.dirname(os.path.abspath(__file__))
    records, chats = make_demo(out_dir), make_chat_demo(out_dir)
    print(
        f"wrote {out_dir}/demo.json ({len(records)} records), the files of {len(CLIENTS)} clients and "
        f"{out_dir}/chat_demo.json ({len(chats)} conversations)"
    )
