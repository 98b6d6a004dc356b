"""Built-in text: the long example (a pass key hidden in repetitive filler), and sentence grammars.

Retrieving the pass key needs attention across the whole context, so a wrong cache
shows up as a wrong number, which makes it the default demo and a smoke test.

A :class:`Grammar` combines a handful of word lists into millions of distinct
sentences and a :class:`SentenceStream` draws them, never twice: varied text
generated offline, for the evaluation's haystacks (:mod:`headspace.evaluation.texts`)
and, from other grammars, the retaining heads' training prose
(:mod:`headspace.eviction.retaining.corpus`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
# about 25 tokens of filler per repetition with SmolLM2's tokenizer
TOKENS_PER_FILLER = 25


def passkey_prompt(passkey: int = 68142, tokens: int = 4000, depth: float = 0.5) -> str:
    """A prompt of about ``tokens`` tokens with ``passkey`` stated at ``depth`` (0 = start, 1 = end)."""
    repeats = max(tokens // TOKENS_PER_FILLER, 2)
    before = int(repeats * depth)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    return (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it.\n"
        + FILLER * before + needle + FILLER * (repeats - before)
        + "\nWhat is the pass key? The pass key is"
    )


@dataclass(frozen=True)
class Grammar:
    """Sentence patterns (``str.format`` fields) and the word list each field draws from."""

    patterns: tuple[str, ...]
    words: dict[str, tuple[str, ...]]

    def sentence(self, rng: random.Random) -> str:
        pattern = rng.choice(self.patterns)
        text = pattern.format(**{name: rng.choice(options) for name, options in self.words.items()})
        return text[0].upper() + text[1:]


class SentenceStream:
    """Distinct sentences of ``grammar`` in a seeded order; ``take(n)`` is always a prefix of ``take(n + 1)``."""

    def __init__(self, grammar: Grammar, seed: str | int):
        self.grammar, self.rng = grammar, random.Random(seed)
        self.sentences: list[str] = []
        self.seen: set[str] = set()

    def take(self, count: int) -> list[str]:
        while len(self.sentences) < count:
            sentence = self.grammar.sentence(self.rng)
            if sentence not in self.seen:
                self.seen.add(sentence)
                self.sentences.append(sentence)
        return self.sentences[:count]
