"""The built-in long example: a pass key hidden in repetitive filler text.

Retrieving it needs attention across the whole context, so a wrong cache shows
up as a wrong number, which makes it the default demo and a smoke test.
"""

from __future__ import annotations

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
