"""Offline training data for retaining heads: English text found on the machine, needles, and generated prose.

Three kinds of sequences (shares set by :func:`corpus_sequences`):

* plain text: docstrings of Python's standard library, license texts in
  ``/usr/share/common-licenses`` and copyright files under ``/usr/share/doc``;
* needles spliced into that text (:func:`synthetic_retrieval`): 1-4 keys and numbers
  in templates deliberately worded unlike the evaluation's, then a question and its answer;
* facts in varied prose (:func:`prose_retrieval`): sentences of training-only grammars
  (:data:`PROSE`) that never repeat, with 1-4 facts (:data:`FACTS`: numbers of 4-9
  digits, codes with letters, names) each stated once, then questions about 1-3 of them
  with their answers. Against spliced needles, which stand out from docstrings by their
  very form, these teach the heads what matters in a real document: a fact stated once
  in unremarkable text. Each sequence names its values' token spans (:class:`TrainingSequence`)
  so that their tokens are trained to be kept whole.

The frozen model's attention from each answer to its fact is part of the targets.
"""

from __future__ import annotations

import ast
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headspace.errors import HeadspaceError
from headspace.prompts import Grammar, SentenceStream

Span = tuple[int, int]  # (start, stop) token positions


@dataclass(frozen=True)
class Fact:
    """Where a stated fact's tokens are: its ``key`` (the words that a question about it repeats to find it:
    a name, a code word), its ``value`` (what the answer copies) and the whole ``statement`` that holds
    them, exact by construction (:func:`encode_statement`), so that training can give them targets of
    their own (:func:`headspace.eviction.retaining.train.lifted_spans`)."""

    key: Span
    value: Span
    statement: Span

    def shifted(self, offset: int) -> Fact:
        return Fact(*((start + offset, stop + offset) for start, stop in (self.key, self.value, self.statement)))

    @property
    def start(self) -> int:
        return self.statement[0]

    @property
    def stop(self) -> int:
        return self.statement[1]


@dataclass
class TrainingSequence:
    """Token ids, the ``facts`` that the sequence states and later asks about, and where its ``questions`` begin
    (None: it asks nothing), for targets taken from the questions' queries alone (``TrainConfig.target_queries``)."""

    ids: list[int]
    facts: list[Fact] = field(default_factory=list)
    questions: int | None = None

    def shifted(self, offset: int, ids: list[int]) -> TrainingSequence:
        """The same facts and questions ``offset`` tokens on, in ``ids``."""
        return TrainingSequence(ids, [fact.shifted(offset) for fact in self.facts],
                                None if self.questions is None else self.questions + offset)


def encode_statement(tokenizer, template: str, key: str, value: str) -> tuple[list[int], Fact]:
    """Token ids of ``template`` with its ``{key}`` and ``{value}`` filled in, and where they are.

    Each placeholder is encoded on its own, taking the space before it (a word-initial token carries its
    space), and so is each stretch of text between them: the spans hold exactly the key's and the value's
    tokens, whatever the tokenizer would have merged across their edges.
    """
    pieces = re.split(r"(\{key\}|\{value\})", template)  # placeholders at odd indices
    ids: list[int] = []
    spans: dict[str, Span] = {}
    space = ""
    for index, piece in enumerate(pieces):
        if index % 2:
            start = len(ids)
            ids += tokenizer(space + (key if piece == "{key}" else value), add_special_tokens=False)["input_ids"]
            spans[piece] = (start, len(ids))
            continue
        space = " " if index + 1 < len(pieces) and piece.endswith(" ") else ""
        if piece[: len(piece) - len(space)]:
            ids += tokenizer(piece[: len(piece) - len(space)], add_special_tokens=False)["input_ids"]
    return ids, Fact(spans["{key}"], spans["{value}"], (0, len(ids)))


def stdlib_docstrings(limit_chars: int = 4_000_000) -> list[str]:
    """Docstrings (200+ characters) of the Python standard library's sources, read with ``ast``, never imported."""
    root = Path(os.__file__).parent
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc)
                    total += len(doc)
        if total >= limit_chars:
            break
    return texts


def system_texts(limit_chars: int = 2_000_000) -> list[str]:
    """License texts and package copyright files that Debian-like systems keep under /usr/share."""
    texts, seen, total = [], set(), 0
    paths = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    for path in paths:
        try:
            if not path.is_file() or path.stat().st_size > 200_000:
                continue
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        key = hash(text)
        if len(text) < 300 or key in seen:
            continue
        seen.add(key)
        texts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return texts


_NEEDLE_WORDS = ("amber", "falcon", "harbor", "quartz", "meadow", "lantern", "cobalt", "orchid", "glacier", "summit",
                 "velvet", "canyon", "ember", "willow", "saffron", "beacon", "tundra", "marble", "comet", "delta",
                 "juniper", "onyx", "prairie", "raven", "spruce", "topaz", "zephyr", "walnut", "indigo", "pebble")
_NEEDLE_TEMPLATES = (
    ("Please remember that the access code for {key} is {value}.", "What is the access code for {key}?",
     "The access code for {key} is {value}."),
    ("Record: {key} -> {value}.", "Which number was recorded for {key}?", "The number recorded for {key} is {value}."),
    ("Note: the locker of {key} opens with {value}.", "Which number opens the locker of {key}?",
     "The locker of {key} opens with {value}."),
    ("The id assigned to {key} is {value}.", "What id was assigned to {key}?", "The id assigned to {key} is {value}."),
)


def synthetic_retrieval(tokenizer, filler_ids: list[int], seq_len: int, rng: random.Random,
                        ask_all: bool = False) -> TrainingSequence:
    """A training sequence: needles spliced into ``filler_ids`` at sentence ends, then a question and its answer
    (``ask_all``: one about each needle, in random order)."""
    statement, question, answer = rng.choice(_NEEDLE_TEMPLATES)
    keys = rng.sample(_NEEDLE_WORDS, rng.randint(1, 4))
    keys = [f"{k}-{rng.choice(_NEEDLE_WORDS)}" if rng.random() < 0.5 else k for k in keys]
    values = [str(rng.randint(10 ** (n - 1), 10**n - 1)) for n in (rng.randint(4, 8) for _ in keys)]
    asked = rng.sample(range(len(keys)), len(keys)) if ask_all else [rng.randrange(len(keys))]
    needles = [encode_statement(tokenizer, f" {statement} ", k, v) for k, v in zip(keys, values)]
    ending = tokenizer("".join("\n" + question.format(key=keys[i]) + " " + answer.format(key=keys[i], value=values[i])
                               for i in asked), add_special_tokens=False)["input_ids"]
    room = seq_len - len(ending) - sum(len(ids) for ids, _ in needles)
    body = list(filler_ids[: max(room, 0)])
    ends = [i + 1 for i, t in enumerate(body) if "." in tokenizer.decode([t])] or [len(body)]
    facts: list[Fact] = []
    for needle, fact in needles:
        at = rng.choice(ends)
        body[at:at] = needle
        ends = [e + len(needle) if e >= at else e for e in ends]
        facts = [f.shifted(len(needle)) if f.start >= at else f for f in facts] + [fact.shifted(at)]
    ids = body + ending
    cut = max(len(ids) - seq_len, 0)
    return TrainingSequence(ids, [f for f in facts if f.start >= cut], len(body)).shifted(-cut, ids[cut:])


# -- varied prose with facts: training-only grammars and fact wordings ------------------------------------
# Written for training only: no pattern, word list or fact wording is shared with the evaluation's texts
# (headspace.evaluation.texts, tasks; tests/test_training_prose.py checks it). A fact stated once in
# otherwise unremarkable prose, and asked about at the end, teaches the heads that such a statement is
# what later questions attend to, whatever the prose around it; the value formats vary (numbers of 4-9
# digits, codes with letters, names) so that no format is what the heads learn to keep.
PROSE = (
    Grammar(  # a laboratory notebook
        patterns=("{person} {lab_did} the {sample} {lab_where} and wrote that it {lab_result}.",
                  "The {sample} was {lab_did} {lab_where}; {person_lower} noted that it {lab_result}.",
                  "After {lab_delay}, the {sample} {lab_result}, so {person_lower} {lab_did} it again."),
        words={
            "person": ("Dr. Alvarez", "The technician", "A visiting chemist", "Professor Lindqvist", "The intern",
                       "Our postdoc", "The safety officer", "A graduate student", "Dr. Mensah", "The lab manager"),
            "person_lower": ("the technician", "a visiting chemist", "the intern", "our postdoc",
                             "the safety officer", "a graduate student", "the lab manager", "the microscopist"),
            "lab_did": ("centrifuged", "weighed", "diluted", "filtered", "heated", "labelled", "cooled", "stirred",
                        "photographed", "titrated", "sealed", "measured"),
            "sample": ("copper sulfate solution", "soil extract", "yeast culture", "buffer", "enzyme mix",
                       "saline control", "crystal batch", "resin sample", "algae suspension", "polymer film",
                       "blood serum", "ethanol fraction"),
            "lab_where": ("in the fume hood", "on the second bench", "in the cold room", "under the lamp",
                          "beside the autoclave", "in a glass beaker", "on the balance", "in the incubator"),
            "lab_result": ("turned faintly pink", "stayed clear", "formed a thin crust", "smelled of vinegar",
                           "separated into two layers", "gave off a little heat", "did not change at all",
                           "grew cloudy", "dried unevenly", "matched the control"),
            "lab_delay": ("ten minutes", "an hour", "the weekend", "two days", "the lunch break", "a short wait"),
        },
    ),
    Grammar(  # a sports season recap
        patterns=("In the {minute} minute, {player} {play} and the {crowd} {reaction}.",
                  "{player} {play} {field_where}, while the {crowd} {reaction}.",
                  "The coach said that {player_lower} {play} because the {weather}."),
        words={
            "minute": ("third", "twelfth", "twentieth", "thirty-first", "fortieth", "fifty-fifth", "sixty-second",
                       "seventy-fourth", "eighty-eighth", "final"),
            "player": ("The young striker", "Their captain", "A substitute", "The veteran keeper", "Our left back",
                       "The tall winger", "A rookie defender", "The midfielder"),
            "player_lower": ("the young striker", "their captain", "a substitute", "the veteran keeper",
                             "our left back", "the tall winger", "a rookie defender", "the midfielder"),
            "play": ("missed an easy chance", "slipped on the wet grass", "headed the ball wide",
                     "won a corner", "blocked a late shot", "argued with the referee", "scored from distance",
                     "passed back to the keeper", "lost a boot", "cleared the ball off the line"),
            "crowd": ("home supporters", "away fans", "small crowd", "families in the stand", "season ticket holders",
                      "students behind the goal"),
            "reaction": ("sang louder", "fell silent", "booed loudly", "laughed nervously", "applauded politely",
                         "threw paper cups", "stood up at once", "checked their phones"),
            "field_where": ("near the corner flag", "on the halfway line", "inside the box", "by the dugout",
                            "on the far touchline"),
            "weather": ("pitch was frozen", "wind kept changing", "floodlights flickered", "rain never stopped",
                        "sun was in his eyes", "grass had been cut too short"),
        },
    ),
    Grammar(  # a cook's kitchen journal
        patterns=("{cook} {cooked} the {dish} with {extra} and {verdict}.",
                  "For {meal}, the {dish} was {cooked} with {extra}; {cook_lower} said that {verdict}.",
                  "Next time {cook_lower} will add less {extra_short}, since the {dish} {flaw}."),
        words={
            "cook": ("Grandpa", "The sous-chef", "My aunt", "The new apprentice", "Our host", "The pastry cook",
                     "A hungry guest", "The caterer"),
            "cook_lower": ("grandpa", "the sous-chef", "my aunt", "the new apprentice", "our host",
                           "the pastry cook", "the caterer"),
            "cooked": ("roasted", "simmered", "baked", "grilled", "steamed", "fried", "braised", "poached"),
            "dish": ("lentil soup", "lamb shoulder", "plum tart", "rice pudding", "mushroom risotto", "trout",
                     "carrot cake", "bean stew", "flatbread", "pumpkin pie", "chicken broth", "cabbage rolls"),
            "extra": ("a pinch of nutmeg", "fresh thyme", "too much salt", "brown butter", "a splash of cider",
                      "smoked paprika", "orange zest", "crushed garlic", "a spoon of honey", "black pepper"),
            "extra_short": ("salt", "pepper", "sugar", "garlic", "cream", "vinegar", "chili"),
            "verdict": ("everyone asked for seconds", "nobody finished it", "the children complained",
                        "it was declared the best yet", "the neighbours wanted the recipe", "it tasted of smoke"),
            "meal": ("breakfast", "the Sunday lunch", "the picnic", "a late supper", "the birthday dinner",
                     "the harvest feast"),
            "flaw": ("came out dry", "was far too sweet", "fell apart", "burnt at the edges", "stayed raw inside",
                     "tasted bland"),
        },
    ),
    Grammar(  # a railway traveller's diary
        patterns=("The {train} to {city} {delay}, so I {pastime} {platform}.",
                  "Between {city} and {city_b}, the {train} {delay} and a {traveller} {pastime_other}.",
                  "I {pastime} while the {train} {delay} outside {city}."),
        words={
            "train": ("night express", "slow local train", "freight convoy", "sleeper", "regional shuttle",
                      "old steam special", "airport link", "mountain railway"),
            "city": ("Utrecht", "Lyon", "Krakow", "Porto", "Graz", "Bergen", "Ghent", "Trieste", "Basel", "Tampere"),
            "city_b": ("Turin", "Leipzig", "Bilbao", "Aarhus", "Zagreb", "Salzburg", "Lille", "Gdansk"),
            "delay": ("stopped for an hour", "ran twenty minutes late", "changed platforms twice",
                      "left without warning", "waited for a signal", "crawled through the tunnel",
                      "was replaced by a bus", "arrived early for once"),
            "pastime": ("read a paperback", "bought a stale sandwich", "wrote postcards", "watched the pigeons",
                        "counted the carriages", "dozed on a bench", "studied the timetable", "chatted with a porter"),
            "pastime_other": ("knitted a scarf", "played cards", "snored loudly", "sketched the hills",
                              "sold coffee from a flask", "complained to the guard"),
            "traveller": ("retired teacher", "pair of hikers", "businessman", "family of five", "soldier on leave",
                          "student with a cello"),
            "platform": ("on platform four", "in the waiting room", "by the ticket office", "at the station cafe",
                         "under the departure board"),
        },
    ),
    Grammar(  # a field botanist's notes
        patterns=("On the {slope}, the {plant} {growth} among the {neighbour}.",
                  "We found {count} {plant} plants {growth} near the {landmark}.",
                  "The {plant} by the {landmark} {growth}, unlike the {neighbour} around it."),
        words={
            "slope": ("north slope", "lower terrace", "limestone ridge", "dry meadow", "marsh edge",
                      "forest clearing", "old quarry floor", "sand dunes"),
            "plant": ("wild orchid", "sea holly", "bog myrtle", "yellow gentian", "alpine aster", "sundew",
                      "creeping thyme", "foxglove", "stinging nettle", "bracken", "wood sorrel", "cotton grass"),
            "growth": ("was flowering early", "had been grazed", "looked stunted", "spread in thick mats",
                       "showed signs of frost", "carried ripe seed", "was barely visible", "grew taller than expected"),
            "neighbour": ("mosses", "heather", "young birches", "tall grasses", "ferns", "brambles", "lichens"),
            "count": ("three", "seven", "a dozen", "forty", "only two", "several hundred", "nine"),
            "landmark": ("fallen oak", "stone wall", "weather station", "stream crossing", "old sheepfold",
                         "fence post", "survey marker"),
        },
    ),
)
FACT_KEYS = ("Orla", "Teodor", "Bashir", "Ingrid", "Mateo", "Yusuf", "Greta", "Anouk", "Dmitri", "Leilani",
             "Soren", "Priya", "Casimir", "Noemi", "Hamish", "Zofia", "Emeka", "Rosalind", "Kenji", "Maren")
FACT_NAMES = ("Agnes Holloway", "Victor Adeyemi", "Lucia Ferreira", "Tomasz Nowak", "Helga Brandt", "Omar Haddad",
              "Ruth Calloway", "Felix Moreau", "Sanna Virtanen", "Ivo Petrov", "Clara Jensen", "Marcus Oyelaran")
FACTS = (  # (statement, question, answer prefix) with {key} and {value}
    ("{key}'s locker combination, by the way, is {value}.", "What is {key}'s locker combination?",
     "{key}'s locker combination is"),
    ("The parcel for {key} carries the tracking code {value}.", "Which tracking code does the parcel for {key} carry?",
     "The parcel for {key} carries the tracking code"),
    ("{key} reserved seat {value} for the concert.", "Which seat did {key} reserve?", "{key} reserved seat"),
    ("The password that {key} chose was {value}.", "What password did {key} choose?", "The password {key} chose was"),
    ("Someone mentioned that {key}'s lucky number is {value}.", "What is {key}'s lucky number?",
     "{key}'s lucky number is"),
    ("The spare key for {key}'s shed was left with {value}.", "Who has the spare key for {key}'s shed?",
     "The spare key for {key}'s shed is with"),
    ("{key} wrote the batch label {value} on the jar.", "Which batch label did {key} write on the jar?",
     "The batch label {key} wrote was"),
    ("The invoice sent to {key} was numbered {value}.", "What was the number of the invoice sent to {key}?",
     "The invoice sent to {key} was numbered"),
)


def fact_value(rng: random.Random) -> str:
    """A fact's value: a number of 4-9 digits, a code with letters, or a person's name."""
    kind = rng.random()
    if kind < 0.6:
        digits = rng.randint(4, 9)
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind < 0.85:
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return (f"{''.join(rng.choice(letters) for _ in range(rng.randint(1, 3)))}-"
                f"{rng.randint(10, 99_999)}{rng.choice(['', '-' + rng.choice(letters)])}")
    return rng.choice(FACT_NAMES)


def prose_retrieval(tokenizer, seq_len: int, rng: random.Random, ask_all: bool = False) -> TrainingSequence:
    """A training sequence: generated prose with 1-4 facts stated once each, then questions about 1-3 of them
    (``ask_all``: about each), each followed by its answer, after at least a few sentences of prose."""
    stream = SentenceStream(rng.choice(PROSE), rng.random())
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    keys = rng.sample(FACT_KEYS, rng.randint(1, 4))
    facts = [(key, rng.choice(FACTS), fact_value(rng)) for key in keys]
    asked = rng.sample(facts, len(facts) if ask_all else rng.randint(1, min(3, len(facts))))
    ending = [encode("\n")]
    for key, (_, question, prefix), value in asked:
        ending.append(encode(f"{question.format(key=key)} {prefix.format(key=key)}"))
        ending.append(encode(f" {value}"))
        ending.append(encode(".\n"))
    pieces: list[list[int]] = []
    length = sum(map(len, ending))
    while length < seq_len:
        pieces.append(encode(" " + stream.take(len(pieces) + 1)[-1]))
        length += len(pieces[-1])
    # each fact replaces a sentence at a random place in the first nine tenths of the prose
    slots = rng.sample(range(max(len(pieces) * 9 // 10, len(facts))), len(facts))
    statements = {slot: encode_statement(tokenizer, " " + statement, key, value)
                  for slot, (key, (statement, _, _), value) in zip(slots, facts)}
    ids: list[int] = []
    stated: list[Fact] = []
    for i, piece in enumerate(pieces):
        if i in statements:
            piece, fact = statements[i]
            stated.append(fact.shifted(len(ids)))
        ids += piece
    body = seq_len - sum(map(len, ending))
    ids = ids[:body]  # a statement may be shorter than the sentence it replaced: then ids is shorter than body
    questions = len(ids)
    for piece in ending:
        ids += piece
    return TrainingSequence(ids, [fact for fact in stated if fact.stop <= questions], questions)


def corpus_sequences(tokenizer, seq_len: int = 1024, seed: int = 0, synthetic: float = 0.5,
                     prose: float = 0.0, ask_all: bool = False) -> Iterator[TrainingSequence]:
    """Endless training sequences of ``seq_len`` tokens: offline text, a ``synthetic`` share of needles spliced
    into it (:func:`synthetic_retrieval`) and a ``prose`` share of facts in generated prose
    (:func:`prose_retrieval`); with ``ask_all``, every stated fact is asked about."""
    if synthetic + prose > 1:
        raise HeadspaceError(f"the synthetic ({synthetic}) and prose ({prose}) shares add up to more than 1")
    rng = random.Random(seed)
    texts = stdlib_docstrings() + system_texts()
    if not texts:
        raise HeadspaceError("no offline training text found (Python stdlib sources or /usr/share/doc)")
    rng.shuffle(texts)
    position = 0

    def take(tokens: int) -> list[int]:
        nonlocal position
        out: list[int] = []
        while len(out) < tokens:
            text = texts[position % len(texts)]
            position += 1
            out += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        return out[:tokens]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    while True:
        draw = rng.random()
        if draw < prose:
            sequence = prose_retrieval(tokenizer, seq_len - len(bos), rng, ask_all)
        elif draw < prose + synthetic:
            sequence = synthetic_retrieval(tokenizer, take(seq_len), seq_len - len(bos), rng, ask_all)
        else:
            sequence = TrainingSequence(take(seq_len - len(bos)))
        yield sequence.shifted(len(bos), bos + sequence.ids)


def random_sequences(vocab_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random token sequences (for tiny random-weight models in tests)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab_size, (seq_len,), generator=generator)
