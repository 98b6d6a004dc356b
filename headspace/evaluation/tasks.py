"""RULER-style synthetic long-context tasks and a harness that runs cache modes side by side.

Tasks (after RULER, Hsieh et al. 2024; generated on the fly from a seed, no data files):

* ``niah_single`` - one "special magic number" for a key, hidden in repetitive noise at a
  given depth (0 = start, 1 = end); the answer is the number.
* ``niah_multikey`` - four needles with different keys; one is asked for.
* ``niah_multivalue`` - four numbers for the same key; score = share of them recalled.
* ``variable_tracking`` - a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... spread over the
  noise; score = share of the chain's variable names recalled.
* ``common_words`` - a numbered list of words, ten of them frequent; score = share of
  the ten recalled.

Haystacks (``haystack=``): ``noise``, the repetitive filler RULER uses, against which any
needle stands out, or ``varied``, distinct generated sentences about a small town
(:mod:`headspace.evaluation.texts`), closer to a real document.

The held-out family (``heldout_single``, ``heldout_multikey``: one or three needles,
one asked for) is written once and kept fixed: a ship's log as haystack, needles
"the vessel <name> carries manifest number <6 digits>", a question worded unlike the
main tasks and unlike the retaining heads' training templates. It is reported apart
from the main tasks, and nothing (heads, defaults) is tuned on it.

:func:`make_document` builds one document holding several needles and a variable chain,
with one question per fact, and :func:`make_logbook` the held-out family's ship's log with
several vessels: the same compressed document can be asked all of its questions (the
questions-after-compression setting of the harness), and each question's prompt (document +
question) is what the question-inside setting would see. Each needle question of a document
has the other needles as distractors, so it is a multi-key question whatever its task's name.

Prompts are plain completions ending in an answer prefix ("... The special magic
number for X mentioned in the provided text is"); SmolLM2-135M-Instruct answers the
needle tasks under ``full`` in that format but not through its chat template. Decoding
is greedy. A sample scores the share of its expected strings found in the output, and
numeric answers also score their digits kept (:func:`digits_kept`): eviction that
tears a multi-token number apart keeps some of its digits, which the plain score hides.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from headspace.errors import HeadspaceError
from headspace.evaluation.texts import LOGBOOK, TOWN, SentenceStream
from headspace.prompts import FILLER

MAIN_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
HELDOUT_TASKS = ("heldout_single", "heldout_multikey")
TASKS = MAIN_TASKS + HELDOUT_TASKS
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
HAYSTACKS = ("noise", "varied")
HAYSTACK_TASKS = NEEDLE_TASKS + ("variable_tracking",)  # the main tasks whose prompt is a haystack
KEY_WORDS = ("apple", "river", "candle", "forest", "silver", "window", "garden", "rocket", "violin", "castle",
             "pepper", "island", "thunder", "mirror", "basket", "dragon", "planet", "saddle", "ladder", "marble",
             "copper", "feather", "jungle", "kettle", "meadow", "needle", "orange", "pillow", "shadow", "tiger")
MAX_NEW_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "variable_tracking": 24,
                  "common_words": 48, "heldout_single": 12, "heldout_multikey": 12}
VESSELS = ("Blue Heron", "Morning Glory", "Sea Sparrow", "Northern Light", "Golden Hind", "Salt Runner",
           "Storm Petrel", "Quiet Lagoon", "Red Kestrel", "Pale Moon", "Wandering Star", "Brave Otter",
           "Lucky Pelican", "Iron Gannet", "Green Cormorant", "Swift Puffin", "Old Lighthouse", "Stone Crab",
           "Night Heron", "Dusky Tern")


@dataclass
class Sample:
    task: str
    length: int  # requested prompt tokens
    depth: float | None
    index: int
    prompt: str  # the context followed by the question
    answers: list[str]
    max_new_tokens: int
    haystack: str = "noise"  # "noise", "varied", or "logbook" (the held-out family's)
    question: str = ""  # the prompt's last part, asked of the context

    @property
    def key(self) -> tuple:
        return (self.task, self.haystack, self.length, self.depth, self.index)

    @property
    def context(self) -> str:
        """The prompt without its question: the document a cache holds before any question is seen."""
        return self.prompt[: len(self.prompt) - len(self.question)]


@dataclass
class Document:
    """One document and several questions about it (each a :class:`Sample` whose prompt is context + question)."""

    length: int
    index: int
    haystack: str
    context: str
    questions: list[Sample] = field(default_factory=list)


# -- task generation --------------------------------------------------------------------------------------
def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(KEY_WORDS)}-{rng.choice(KEY_WORDS)}"
        if key not in used and key.split("-")[0] != key.split("-")[1]:
            used.add(key)
            return key


def _fit(build: Callable[[int], str], tokens: int, count: Callable[[str], int]) -> str:
    """The longest ``build(n)`` (n filler units) that is at most ``tokens`` tokens long."""
    low, high = 1, 1
    size = count(build(high))
    while size <= tokens:
        low, high = high, high * 2
        grown = count(build(high))
        if grown <= size:  # more units no longer lengthen the text: doubling would never end
            raise HeadspaceError(f"this task's text stops growing at {size} tokens, short of {tokens}")
        size = grown
    while high - low > 1:
        middle = (low + high) // 2
        if count(build(middle)) <= tokens:
            low = middle
        else:
            high = middle
    return build(low)


def _filler(haystack: str, seed: str) -> Callable[[int], list[str]]:
    """``units -> pieces`` of haystack text: the noise filler repeated, or distinct generated sentences."""
    if haystack == "noise":
        return lambda units: [FILLER] * units
    grammar = {"varied": TOWN, "logbook": LOGBOOK}.get(haystack)
    if grammar is None:
        raise HeadspaceError(f"unknown haystack '{haystack}'; choose from {', '.join(HAYSTACKS)}")
    stream = SentenceStream(grammar, seed)
    return lambda units: [sentence + " " for sentence in stream.take(units)]


def _haystack(pieces: list[str], inserts: list[tuple[float, str]]) -> str:
    """The haystack ``pieces`` with ``inserts`` (depth, text) placed at their depths (0 = start, 1 = end)."""
    parts = list(pieces)
    for depth, text in sorted(inserts, key=lambda item: -item[0]):
        parts.insert(round(depth * len(pieces)), text + " ")
    return "".join(parts)


_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.\n")
_VARIABLE_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_LOG_INTRO = "Below is an excerpt from a ship's log. Read it carefully; questions about it follow.\n"


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _needle_question(key: str, plural: bool = False) -> str:
    if plural:
        return (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special "
                f"magic numbers for {key} mentioned in the provided text are")
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? The special magic "
            f"number for {key} mentioned in the provided text is")


def _manifest(vessel: str, value: str) -> str:
    return f"In the harbour register, the vessel {vessel} carries manifest number {value}."


def _manifest_question(vessel: str) -> str:
    return (f"\nAccording to the log above, which manifest number does the vessel {vessel} carry? "
            f"The vessel {vessel} carries manifest number")


def _variable_chain(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A value, five variable names and the assignments ``VAR A = value``, ``VAR B = VAR A`` ..."""
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return value, names, chain


def _variable_question(value: str) -> str:
    return (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are:")


def make_sample(task: str, tokenizer, length: int, seed: int, index: int = 0, depth: float | None = None,
                haystack: str = "noise") -> Sample:
    """One sample of ``task`` with a prompt of at most ``length`` tokens, reproducible from its arguments.

    ``haystack`` ("noise" or "varied") is the text the main tasks hide their needles in; the held-out
    family always uses its own (the ship's log) and common_words none.
    """
    if task not in TASKS:
        raise HeadspaceError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise HeadspaceError(f"unknown haystack '{haystack}'; choose from {', '.join(HAYSTACKS)}")
    haystack = "logbook" if task in HELDOUT_TASKS else haystack if task in HAYSTACK_TASKS else "noise"
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}:{haystack}")
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    filler = _filler(haystack, f"{seed}:{task}:{index}")

    def sample(intro: str, inserts: list[tuple[float, str]], question: str, answers: list[str],
               where: float | None) -> Sample:
        prompt = _fit(lambda n: intro + _haystack(filler(n), inserts) + question, length, count)
        return Sample(task, length, where, index, prompt, answers, MAX_NEW_TOKENS[task], haystack, question)

    used: set[str] = set()
    if task in NEEDLE_TASKS:
        key = _key(rng, used)
        depth = rng.random() if depth is None else depth
        if task == "niah_single":
            values = [_number(rng)]
            needles = [(depth, _needle(key, values[0]))]
        elif task == "niah_multikey":
            values = [_number(rng)]
            needles = [(depth, _needle(key, values[0]))]
            needles += [(rng.random(), _needle(_key(rng, used), _number(rng))) for _ in range(3)]
        else:
            values = [_number(rng) for _ in range(4)]
            needles = [(depth if i == 0 else rng.random(), _needle(key, v)) for i, v in enumerate(values)]
        plural = task == "niah_multivalue"
        return sample(_NIAH_INTRO, needles, _needle_question(key, plural), values, None if plural else depth)
    if task in HELDOUT_TASKS:
        vessels = rng.sample(VESSELS, 3 if task == "heldout_multikey" else 1)
        values = [str(rng.randint(100_000, 999_999)) for _ in vessels]
        depth = rng.random() if depth is None else depth
        needles = [(depth if i == 0 else rng.random(), _manifest(v, n)) for i, (v, n) in enumerate(zip(vessels,
                                                                                                       values))]
        return sample(_LOG_INTRO, needles, _manifest_question(vessels[0]), values[:1], depth)
    if task == "variable_tracking":
        value, names, chain = _variable_chain(rng)
        depths = sorted(rng.random() for _ in chain)
        return sample(_VARIABLE_INTRO, list(zip(depths, chain)), _variable_question(value), names, None)
    # common_words
    vocabulary = _words(rng, 10 + max(590, length // 4))  # enough rare words (two list lines each) to fill length
    common, rare = vocabulary[:10], vocabulary[10:]
    intro = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the " \
            "ones that appear most often.\n"
    question = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
                "appear most often in the list are:")

    def build(n: int) -> str:
        words = [w for w in common for _ in range(max(n // 40, 3) * 3)] + [w for w in rare[:n] for _ in range(2)]
        random.Random(f"{seed}:{index}:{n}").shuffle(words)
        return intro + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(words)) + question

    prompt = _fit(lambda n: build(min(n, len(rare))), length, count)
    return Sample(task, length, None, index, prompt, list(common), MAX_NEW_TOKENS[task], "noise", question)


DOCUMENT_DEPTHS = (0.1, 0.35, 0.6, 0.85)
DOCUMENT_TASKS = ("niah_single", "niah_multikey", "variable_tracking")  # the questions a shared document holds


def make_document(tokenizer, length: int, seed: int, index: int = 0, haystack: str = "varied",
                  depths: tuple[float, ...] = DOCUMENT_DEPTHS, tasks: tuple[str, ...] = DOCUMENT_TASKS) -> Document:
    """One document of at most ``length`` tokens (with its longest question) and a question per fact it holds.

    It holds the facts of the ``tasks`` asked, each introduced as the question-inside prompts
    introduce it: a needle at each of ``depths`` (questions ``niah_single``, depth the needle's),
    one more at a random depth (``niah_multikey``) and a variable chain (``variable_tracking``).
    Every needle has its own key, and every needle question has the document's other needles as
    distractors: with three depths and ``niah_multikey``, three, as many as a question-inside
    ``niah_multikey`` prompt has. A multi-value key is no fact of a shared document: its three
    needles repeat one key, and SmolLM2 answers the other keys' questions with its numbers
    (the harness gives ``niah_multivalue`` a document of its own).
    """
    unknown = sorted(set(tasks) - set(DOCUMENT_TASKS))
    if unknown:
        raise HeadspaceError(f"a document holds no task(s) {', '.join(unknown)}; it holds {', '.join(DOCUMENT_TASKS)}")
    filler = _filler(haystack, f"{seed}:document:{index}")
    rng = random.Random(f"{seed}:document:{length}:{index}:{haystack}")
    used: set[str] = set()
    needles = [(depth, _key(rng, used), _number(rng)) for depth in depths] if "niah_single" in tasks else []
    asked = [("niah_single", depth, _needle_question(key), [number]) for depth, key, number in needles]
    if "niah_multikey" in tasks:
        needles.append((rng.random(), _key(rng, used), _number(rng)))
        depth, key, number = needles[-1]
        asked.append(("niah_multikey", depth, _needle_question(key), [number]))
    inserts = [(depth, _needle(key, number)) for depth, key, number in needles]
    intro = _NIAH_INTRO if needles else ""
    if "variable_tracking" in tasks:
        value, names, chain = _variable_chain(rng)
        inserts += list(zip(sorted(rng.random() for _ in chain), chain))
        asked.append(("variable_tracking", None, _variable_question(value), names))
        intro += _VARIABLE_INTRO
    return _document(tokenizer, length, index, haystack, intro, filler, inserts, asked)


def make_logbook(tokenizer, length: int, seed: int, index: int = 0, depths: tuple[float, ...] = DOCUMENT_DEPTHS,
                 tasks: tuple[str, ...] = HELDOUT_TASKS) -> Document:
    """The held-out family as one document: a ship's log with a vessel's manifest number at each of ``depths``
    (questions ``heldout_single``) and, with ``heldout_multikey`` in ``tasks``, one more at a random depth."""
    rng = random.Random(f"{seed}:logbook:{length}:{index}")
    vessels = rng.sample(VESSELS, len(depths) + 1)
    facts = [(depth, vessel, str(rng.randint(100_000, 999_999)))
             for depth, vessel in zip((*depths, rng.random()), vessels)]
    asked = [("heldout_single" if i < len(depths) else "heldout_multikey", depth, _manifest_question(vessel), [n])
             for i, (depth, vessel, n) in enumerate(facts)]
    asked = [question for question in asked if question[0] in tasks]
    inserts = [(depth, _manifest(vessel, n)) for depth, vessel, n in facts]
    return _document(tokenizer, length, index, "logbook", _LOG_INTRO, _filler("logbook", f"{seed}:logbook:{index}"),
                     inserts, asked)


def _document(tokenizer, length: int, index: int, haystack: str, intro: str, filler: Callable[[int], list[str]],
              inserts: list[tuple[float, str]], asked: list[tuple[str, float | None, str, list[str]]]) -> Document:
    """The longest document that leaves room for its longest question within ``length`` tokens."""
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    room = length - max(count(question) for _, _, question, _ in asked)
    context = _fit(lambda n: intro + _haystack(filler(n), inserts), room, count)
    questions = [Sample(task, length, depth, index, context + question, answers, MAX_NEW_TOKENS[task], haystack,
                        question) for task, depth, question, answers in asked]
    return Document(length, index, haystack, context, questions)


def _words(rng: random.Random, count: int) -> list[str]:
    """Distinct pronounceable lowercase words."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def score(sample: Sample, output: str) -> float:
    """Share of the expected strings that occur in ``output`` (case-insensitive)."""
    text = output.lower()
    return sum(answer.lower() in text for answer in sample.answers) / len(sample.answers)


def digits_kept(answer: str, output: str) -> int:
    """How many of ``answer``'s digits survive in place in the number of ``output`` that keeps the most
    (compared from the first digit: 69210 for 69720 keeps 3 of 5)."""
    return max((sum(a == b for a, b in zip(answer, number)) for number in re.findall(r"\d+", output)), default=0)


def digit_score(sample: Sample, output: str) -> float | None:
    """Mean share of digits kept over the sample's numeric answers (None when its answers are not numbers)."""
    numbers = [answer for answer in sample.answers if answer.isdigit()]
    if not numbers:
        return None
    return sum(digits_kept(answer, output) / len(answer) for answer in numbers) / len(numbers)
