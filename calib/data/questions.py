"""Questions with known answers placed in (or derived from) any document: the task truth of calibration.

A ``TruthDocument`` is a document with items inserted at sentence boundaries and the questions that ask for them,
asked *after* the (compressed) context — compression stays query-agnostic:

* ``needle`` — single facts at several depths, templates cycling over numbers, names, dates and places
  ("The secret passcode for the green door is 48213." / "What is the secret passcode for the green door?");
* ``kv`` — a key–value retrieval block (RULER-style: several "key → value" lines in one place, one key asked);
* ``multi_needle`` — one key with several values spread over the document, all of them asked at once;
* ``document`` — generic questions about the text whose reference is the *full-cache model's own answer*
  (agreement with it is the criterion: the "flip" rate of Dutta et al. 2024); they have no gold string.

Every inserted item's character span is recorded (``TruthDocument.spans``) so that label-free calibration probes
can be kept off them (``calib.calibration.truth.item_token_spans``). Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from kvcalib.calib.errors import KvcalibError

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden", "brown",
           "grey", "violet", "crimson", "turquoise", "scarlet"]
FIRST = ["Mirela", "Tobias", "Anouk", "Casimir", "Ingrid", "Rafael", "Yolanda", "Dmitri", "Leontyne", "Ewan",
         "Soraya", "Benedikt", "Marisol", "Oskar", "Philippa", "Teodor"]
LAST = ["Vance", "Okafor", "Lindqvist", "Moreau", "Halvorsen", "Castellano", "Brennan", "Novak", "Ashdown",
        "Takahashi", "Delacroix", "Whitcombe", "Arslan", "Penhaligon", "Kowalczyk", "Ferreira"]
SHIPS = ["Aurora", "Kestrel", "Meridian", "Osprey", "Calypso", "Sentinel", "Halcyon", "Tempest"]
ROLES = ["captain", "navigator", "engineer", "surgeon", "cook", "pilot"]
EVENTS = ["harbour festival", "lantern parade", "river regatta", "glass fair", "orchard market", "clock-tower vote",
          "salt exhibition", "kite contest"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OBJECTS = ["golden compass", "silver key", "old map", "jade statue", "brass telescope", "red notebook",
           "ivory chess set", "copper lantern"]
CITIES = ["Valparaiso", "Trondheim", "Marrakesh", "Ljubljana", "Cartagena", "Hobart", "Tbilisi", "Quebec",
          "Antwerp", "Kyoto", "Windhoek", "Galway", "Bergamo", "Tallinn", "Mendoza", "Halifax"]
KV_WORDS = ["amber", "cobalt", "dusty", "ivory", "lunar", "mossy", "opal", "rusty", "sable", "topaz", "velvet",
            "willow"]
KV_ANIMALS = ["fox", "owl", "elk", "yak", "lynx", "crane", "otter", "heron", "bison", "wren", "moth", "newt"]
MULTI_WORDS = ["lighthouse", "glacier", "orchid", "volcano", "meadow", "canyon", "harbor", "citadel"]

# Generic questions about any text. The calibration's self-answer prompts (calib.calibration.fidelity) are a
# disjoint set: the calibration never sees these.
DOCUMENT_QUESTIONS = [
    "What is the main topic of the text above? Answer in a few words.",
    "Which person is mentioned first in the text above?",
    "What is the last sentence of the text above about?",
    "Name one place or organisation mentioned in the text above.",
]
NEEDLE_TEMPLATES = ("number", "name", "date", "place")


class QuestionError(KvcalibError):
    pass


@dataclass
class Question:
    """One question asked after the context. ``answers``: strings that must all appear in a correct output (empty
    for ``document`` questions, whose reference is the full-cache answer)."""

    kind: str  # "needle" | "kv" | "multi_needle" | "document"
    question: str
    answers: tuple[str, ...] = ()
    template: str = ""  # number | name | date | place | kv | multi | document
    depth: float | None = None  # where the item sits (0 = start, 1 = end of the document)
    meta: dict = field(default_factory=dict)

    @property
    def has_gold(self) -> bool:
        return bool(self.answers)

    def is_correct(self, output: str) -> bool:
        """Every gold string occurs in ``output`` (case, spacing and punctuation around it ignored)."""
        if not self.answers:
            raise QuestionError("a document question has no gold answer: compare with the full-cache answer")
        out = normalize(output)
        return all(normalize(a) in out for a in self.answers)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "question": self.question, "answers": list(self.answers),
                "template": self.template, "depth": self.depth, "meta": dict(self.meta)}


@dataclass
class TruthDocument:
    text: str  # the document with every item inserted
    questions: list[Question]
    spans: list[tuple[int, int]]  # character spans [start, end) of the inserted items in ``text``
    seed: int = 0
    source: str = ""  # the original document

    def to_dict(self) -> dict:
        return {"text": self.text, "questions": [q.to_dict() for q in self.questions],
                "spans": [list(s) for s in self.spans], "seed": self.seed}


@dataclass
class QuestionConfig:
    """How many items of each kind are placed in a document (0 disables a kind)."""

    n_needles: int = 4  # single needles, templates cycling number / name / date / place, depths spread 0.1..0.9
    kv_pairs: int = 4  # lines of the key–value block (one key asked)
    multi_values: int = 2  # values of the multi-needle key (all asked at once)
    doc_questions: int = 2  # generic questions about the text (reference = full-cache answer)

    def validate(self) -> QuestionConfig:
        for name in ("n_needles", "kv_pairs", "multi_values", "doc_questions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise QuestionError(f"{name} must be an integer >= 0, got {v!r}")
        if self.kv_pairs == 1:
            raise QuestionError("kv_pairs must be 0 or at least 2 (a retrieval block needs distractors)")
        if self.multi_values == 1:
            raise QuestionError("multi_values must be 0 or at least 2")
        if self.doc_questions > len(DOCUMENT_QUESTIONS):
            raise QuestionError(f"doc_questions must be at most {len(DOCUMENT_QUESTIONS)}")
        if not (self.n_needles or self.kv_pairs or self.multi_values or self.doc_questions):
            raise QuestionError("no questions: every kind is disabled")
        return self


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (digits and letters kept), single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


ARTICLES = frozenset({"a", "an", "the"})


def token_f1(reference: str, answer: str, ignore: frozenset[str] | set[str] = ARTICLES) -> float:
    """SQuAD-style token F1 between two answers over their normalised words minus ``ignore`` (articles; pass the
    question's words too so that an echo of the question does not count as agreement); 1.0 when both are empty."""
    ref = [w for w in normalize(reference).split() if w not in ignore]
    ans = [w for w in normalize(answer).split() if w not in ignore]
    if not ref or not ans:
        return float(ref == ans)
    common: dict[str, int] = {}
    for w in ref:
        common[w] = common.get(w, 0) + 1
    overlap = 0
    for w in ans:
        if common.get(w, 0) > 0:
            overlap += 1
            common[w] -= 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(ans), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _needle(template: str, rng: random.Random) -> tuple[str, str, str]:
    """(sentence, question, answer) of one needle."""
    if template == "number":
        colour, code = rng.choice(COLOURS), str(rng.randrange(10000, 100000))
        return (f"The secret passcode for the {colour} door is {code}.",
                f"What is the secret passcode for the {colour} door? Answer with the number only.", code)
    if template == "name":
        role, ship = rng.choice(ROLES), rng.choice(SHIPS)
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        return (f"The name of the {role} of the ship {ship} is {name}.",
                f"What is the name of the {role} of the ship {ship}? Answer with the name only.", name)
    if template == "date":
        event = rng.choice(EVENTS)
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1850, 1999)}"
        return (f"The {event} took place on {date}.",
                f"On what date did the {event} take place? Answer with the date only.", date)
    if template == "place":
        obj, city = rng.choice(OBJECTS), rng.choice(CITIES)
        return (f"The {obj} is hidden in {city}.",
                f"In which city is the {obj} hidden? Answer with the city only.", city)
    raise QuestionError(f"unknown needle template {template!r}: expected one of {NEEDLE_TEMPLATES}")


def _cut(text: str, depth: float) -> int:
    """The sentence boundary ('. ' or a line break) nearest below ``depth`` of ``text`` (0 at the start)."""
    target = int(len(text) * depth)
    if depth <= 0 or target <= 0:
        return 0
    cut = max(text.rfind(". ", 0, target), text.rfind("\n", 0, target))
    if cut < 0:
        return 0
    return cut + (2 if text.startswith(". ", cut) else 1)


def insert_items(text: str, items: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert each ``(depth, item)`` at the sentence boundary nearest below its depth in the original ``text``
    (items at one boundary keep their order). Returns the new text and each item's span, in the order given."""
    placed = sorted(((_cut(text, d), i, s) for i, (d, s) in enumerate(items)), key=lambda t: (t[0], t[1]))
    out, spans, prev, offset = [], [None] * len(items), 0, 0
    for cut, i, item in placed:
        out.append(text[prev:cut])
        offset += cut - prev
        sep = "" if cut == 0 or text[cut - 1] in " \n" else " "
        piece = sep + item + " "
        spans[i] = (offset + len(sep), offset + len(sep) + len(item))
        out.append(piece)
        offset += len(piece)
        prev = cut
    out.append(text[prev:])
    return "".join(out), spans  # type: ignore[return-value]


def _depths(n: int, rng: random.Random, lo: float = 0.1, hi: float = 0.9) -> list[float]:
    """``n`` depths spread over [lo, hi] with a little jitter."""
    if n == 0:
        return []
    width = (hi - lo) / n
    return [round(lo + width * (i + rng.uniform(0.2, 0.8)), 3) for i in range(n)]


def make_questions(document: str, seed: int = 0, config: QuestionConfig | None = None) -> TruthDocument:
    """Insert needles, a key–value block and a multi-needle into ``document`` and write their questions, plus
    generic document questions. Deterministic in ``seed``."""
    if not isinstance(document, str) or not document.strip():
        raise QuestionError("the document is empty")
    config = (config or QuestionConfig()).validate()
    rng = random.Random(seed)
    items: list[tuple[float, str]] = []
    questions: list[Question] = []
    owners: list[int] = []  # question index of each item
    start = rng.randrange(len(NEEDLE_TEMPLATES))
    for i, depth in enumerate(_depths(config.n_needles, rng)):
        template = NEEDLE_TEMPLATES[(start + i) % len(NEEDLE_TEMPLATES)]
        sentence, q, a = _needle(template, rng)
        items.append((depth, sentence))
        owners.append(len(questions))
        questions.append(Question("needle", q, (a,), template, depth))
    if config.kv_pairs:
        keys = [f"{w}-{a}" for w, a in zip(rng.sample(KV_WORDS, config.kv_pairs), rng.sample(KV_ANIMALS,
                                                                                              config.kv_pairs))]
        values = [str(rng.randrange(1000, 10000)) for _ in keys]
        block = "Registry of codes: " + "; ".join(f"the code of {k} is {v}" for k, v in zip(keys, values)) + "."
        j = rng.randrange(len(keys))
        depth = round(rng.uniform(0.2, 0.8), 3)
        items.append((depth, block))
        owners.append(len(questions))
        questions.append(Question("kv", f"In the registry of codes, what is the code of {keys[j]}? Answer with "
                                        f"the number only.", (values[j],), "kv", depth,
                                  {"keys": keys, "values": values}))
    if config.multi_values:
        word = rng.choice(MULTI_WORDS)
        values = [str(rng.randrange(100, 1000)) for _ in range(config.multi_values)]
        depths = _depths(config.multi_values, rng)
        qi = len(questions)
        for d, v in zip(depths, values):
            items.append((d, f"One of the special magic numbers for {word} is {v}."))
            owners.append(qi)
        questions.append(Question("multi_needle", f"What are all the special magic numbers for {word}? Answer with "
                                                  f"the numbers only.", tuple(values), "multi", depths[0],
                                  {"depths": depths}))
    for q in rng.sample(DOCUMENT_QUESTIONS, config.doc_questions):
        questions.append(Question("document", q, (), "document"))
    text, spans = insert_items(document, items)
    for (a, b), qi in zip(spans, owners):
        questions[qi].meta.setdefault("spans", []).append([a, b])
    return TruthDocument(text=text, questions=questions, spans=spans, seed=seed, source=document)
