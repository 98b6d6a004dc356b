"""Haystack text for the evaluation: sentences from small grammars that never repeat within a prompt.

The old haystack (:data:`headspace.prompts.FILLER` repeated) is so uniform that any
needle stands out; real documents are varied. Each grammar here combines a handful
of word lists into millions of distinct sentences; a stream draws them in a seeded
order and never yields the same sentence twice, so a 32K-token haystack is varied
text throughout. Two grammars, written once and kept fixed:

* :data:`TOWN` - everyday life in a small town, the main evaluation's varied haystack;
* :data:`LOGBOOK` - a ship's log, only for the held-out prompt family.

Neither shares text with the retaining heads' training corpus (Python docstrings, license
files and the corpus's own prose grammars, :mod:`headspace.eviction.retaining.corpus`;
``tests/test_training_prose.py`` checks patterns, phrases and fact wordings) nor with each
other.
"""

from __future__ import annotations

from headspace.prompts import Grammar, SentenceStream

__all__ = ["LOGBOOK", "TOWN", "Grammar", "SentenceStream"]


TOWN = Grammar(
    patterns=("{who} {did} {what} {where} {when}{how}.", "{when}, {who_lower} {did} {what} {where}{how}.",
              "{where_cap}, {who_lower} {did} {what}{how}, {when}."),
    words={
        "who": ("The baker", "A young teacher", "My neighbour", "The old fisherman", "A tired nurse", "The mayor",
                "Her brother", "The librarian", "A street musician", "The gardener", "Our landlord",
                "The night guard", "A visiting painter", "The bus driver", "His grandmother", "The headmistress",
                "A quiet student", "The postman", "The chef", "A local farmer", "The carpenter", "The pharmacist",
                "A shy child", "The tailor", "The florist", "A retired judge", "The museum guide", "Our cousin",
                "The beekeeper", "The blacksmith"),
        "who_lower": ("the baker", "a young teacher", "my neighbour", "the old fisherman", "a tired nurse",
                      "the mayor", "her brother", "the librarian", "a street musician", "the gardener",
                      "our landlord", "the night guard", "a visiting painter", "the bus driver", "his grandmother",
                      "the headmistress", "a quiet student", "the postman", "the chef", "a local farmer"),
        "did": ("repaired", "painted", "carried", "found", "sold", "borrowed", "cleaned", "wrapped", "described",
                "photographed", "counted", "delivered", "forgot", "admired", "measured", "returned", "opened",
                "hid", "polished", "ordered", "collected", "studied", "dropped", "moved", "weighed"),
        "what": ("a wooden chair", "the broken clock", "three baskets of apples", "a blue umbrella",
                 "an old map of the valley", "the kitchen window", "a box of letters", "the garden gate",
                 "a pair of boots", "the village bell", "a jar of honey", "the red bicycle", "a stack of newspapers",
                 "the iron kettle", "a small rowing boat", "the chapel roof", "a basket of bread", "the stone bridge",
                 "a bundle of firewood", "the market stall", "a silver spoon", "the tall ladder",
                 "a crate of oranges", "the piano", "a green lantern", "the reading room", "a woollen scarf",
                 "the fishing nets", "a glass vase", "the bakery oven"),
        "where": ("near the harbour", "behind the town hall", "in the old quarter", "beside the river",
                  "at the top of the hill", "outside the bakery", "in the village square", "across from the station",
                  "under the chestnut trees", "next to the school", "by the mill pond", "on the market road"),
        "where_cap": ("Near the harbour", "Behind the town hall", "In the old quarter", "Beside the river",
                      "At the top of the hill", "Outside the bakery", "In the village square", "By the mill pond"),
        "when": ("early on Monday", "before the storm", "after lunch", "late in the evening", "during the festival",
                 "on a rainy afternoon", "at dawn", "last winter", "the day before the wedding",
                 "while the town slept", "in the middle of summer", "on the first of the month",
                 "after the market closed", "just before noon", "during the long holiday", "one foggy morning"),
        "how": ("", "", "", " because nobody else would", " and then went home", " without saying a word",
                " for the first time in years", " with great care", " as the neighbours watched",
                " and laughed about it later", " in a hurry", " while humming an old song"),
    },
)

LOGBOOK = Grammar(
    patterns=("At {hour} the {watch} recorded {seen} while the ship {held}.",
              "{seen} was reported by the {watch} at {hour}; the ship {held}.",
              "Log entry, {hour}: {seen}, noted by the {watch}, and the ship {held}."),
    words={
        "hour": tuple(f"{bell} of the {watch} watch"
                      for bell in ("one bell", "two bells", "three bells", "four bells", "five bells", "six bells",
                                   "seven bells", "eight bells")
                      for watch in ("first", "middle", "morning", "forenoon", "afternoon", "dog")),
        "watch": ("first mate", "lookout", "navigator", "second officer", "helmsman", "boatswain",
                  "radio operator", "cook's boy", "ship's surgeon", "deckhand", "chief engineer", "cadet"),
        "seen": ("a long swell from the west", "gulls circling off the bow", "a faint light on the horizon",
                 "rising wind and thin rain", "calm water and a falling barometer", "dolphins off the starboard side",
                 "fog settling over the deck", "a tanker passing far to port", "ice forming on the rigging",
                 "clear skies and a bright moon", "driftwood in the current", "a change in the colour of the sea",
                 "heavy cloud building to the south", "a whale spouting astern", "St Elmo's fire on the mast"),
        "held": ("kept a steady course north", "steered toward the cape", "stood off the reef",
                 "made eight knots", "pushed against the tide", "crossed the shipping lane",
                 "turned slowly to the east", "rode at anchor in the bay", "reduced sail", "kept clear of the shoals"),
    },
)
