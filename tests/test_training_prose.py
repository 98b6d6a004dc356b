"""The retaining heads' training prose: facts in generated prose, disjoint from the evaluation, and span targets."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headspace.evaluation.tasks import HELDOUT_TASKS, KEY_WORDS, MAIN_TASKS, VESSELS, make_document, make_sample
from headspace.evaluation.texts import LOGBOOK, TOWN
from headspace.eviction.retaining import corpus
from headspace.eviction.retaining.corpus import (
    FACTS,
    PROSE,
    Fact,
    TrainingSequence,
    corpus_sequences,
    encode_statement,
    prose_retrieval,
)
from headspace.eviction.retaining.train import (
    TrainConfig,
    capture,
    lifted_spans,
    retaining_loss,
    train_retaining_heads,
)
from headspace.prompts import SentenceStream

VOCAB = 128


class WordTokenizer:
    """Whitespace-separated pieces, each one id (a piece's leading space kept with it): spans are easy to read."""

    bos_token_id = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in re.findall(r"\s*\S+|\s+", text)]}

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[i] for i in ids)


def test_prose_sequences_state_each_fact_once_and_ask_with_its_answer():
    tokenizer = WordTokenizer()
    for seed in range(20):
        sequence = prose_retrieval(tokenizer, 600, random.Random(seed))
        assert sequence == prose_retrieval(tokenizer, 600, random.Random(seed))  # deterministic
        assert 500 < len(sequence.ids) <= 600 and 1 <= len(sequence.facts) <= 4
        text = tokenizer.decode(sequence.ids)
        body, questions = text.rsplit("\n", 1)[0].split("\n")[0], text.split("\n", 1)[1]
        asked = 0
        for fact in sequence.facts:
            value = tokenizer.decode(sequence.ids[slice(*fact.value)]).strip()
            key = tokenizer.decode(sequence.ids[slice(*fact.key)]).strip()
            assert re.fullmatch(r"\d{4,9}|[A-Z]{1,3}-\d{2,5}(-[A-Z])?|[A-Z][a-z]+ [A-Z][a-z]+", value), value
            assert key in corpus.FACT_KEYS and fact.key[1] <= fact.value[0]  # a name, stated before the value
            assert body.count(value) == 1 and body.count(key) == 1  # stated once, in the prose
            asked += f" {value}.\n" in questions
            assert (key in questions) >= (f" {value}.\n" in questions)  # the question repeats the key
            statement = tokenizer.decode(sequence.ids[slice(*fact.statement)])
            assert fact.start <= fact.key[0] < fact.value[1] <= fact.stop and statement[0] == " "
            assert any(statement == " " + template.format(key=key, value=value) for template, _, _ in FACTS)
        assert asked >= 1 and fact.stop < len(sequence.ids) - 16  # questions come after the facts, with answers


def test_corpus_mixes_plain_text_needles_and_prose_and_shifts_spans_past_the_start_token():
    tokenizer = WordTokenizer()
    tokenizer.bos_token_id = 999
    stream = corpus_sequences(tokenizer, 300, seed=0, synthetic=0.3, prose=0.4)
    sequences = list(itertools.islice(stream, 30))
    assert all(isinstance(s, TrainingSequence) and s.ids[0] == 999 and len(s.ids) <= 300 for s in sequences)
    with_facts = [s for s in sequences if s.facts]
    assert 5 < len(with_facts) < 25
    for sequence in with_facts:
        for fact in sequence.facts:
            for start, stop in (fact.key, fact.value):
                assert start >= 1 and tokenizer.decode(sequence.ids[start:stop]).startswith(" ")
    with pytest.raises(Exception, match="add up to"):
        next(corpus_sequences(tokenizer, 300, synthetic=0.7, prose=0.5))


def eval_prompts(tokenizer) -> list[str]:
    prompts = [make_sample(task, tokenizer, 1500, seed=3, depth=0.5, haystack=haystack).prompt
               for task in MAIN_TASKS + HELDOUT_TASKS for haystack in ("noise", "varied")]
    document = make_document(tokenizer, 1500, seed=3, haystack="varied")
    return prompts + [document.context] + [q.question for q in document.questions]


def test_training_prose_shares_no_sentence_pattern_or_fact_wording_with_the_evaluation():
    tokenizer = WordTokenizer()
    evaluated = "\n".join(eval_prompts(tokenizer))
    training = [s for grammar in PROSE for s in SentenceStream(grammar, 0).take(400)]
    eval_sentences = set(SentenceStream(TOWN, 0).take(3000) + SentenceStream(LOGBOOK, 0).take(3000))
    assert not set(training) & eval_sentences
    assert not any(sentence in evaluated for sentence in training)
    # no pattern and no phrase of two or more words from a training word list occurs in the evaluation's grammars
    eval_patterns = {p for grammar in (TOWN, LOGBOOK) for p in grammar.patterns}
    eval_phrases = {w for grammar in (TOWN, LOGBOOK) for words in grammar.words.values() for w in words}
    for grammar in PROSE:
        assert not set(grammar.patterns) & eval_patterns
        for words in grammar.words.values():
            shared = [w for w in words if len(w.split()) > 1 and any(w.lower() in e.lower() for e in eval_phrases)]
            assert not shared, shared
    # fact wordings: no fixed phrase of a training template is in any evaluation prompt, and vice versa
    for template in FACTS + corpus._NEEDLE_TEMPLATES:
        for part in template:
            for phrase in re.split(r"\{key\}(?:'s)?|\{value\}", part):
                phrase = phrase.strip(" .?:,")
                if len(phrase.split()) >= 3:
                    assert phrase not in evaluated, phrase
            assert not any(word in part for word in ("magic", "manifest", "vessel", "special"))
    assert not set(corpus.FACT_KEYS) & set(KEY_WORDS) and not set(corpus.FACT_KEYS) & set(VESSELS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).eval()


def test_lifted_spans_give_every_token_of_a_group_the_group_maximum(model):
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    facts = [Fact(key=(6, 8), value=(10, 17), statement=(5, 18)),
             Fact(key=(24, 25), value=(30, 33), statement=(22, 34))]
    _, plain = capture(model, ids, smooth=1, tail=0, gap=3)
    for mode, groups in (("value", [[(10, 17)], [(30, 33)]]), ("fact", [[(6, 8), (10, 17)], [(24, 25), (30, 33)]]),
                         ("statement", [[(5, 18)], [(22, 34)]])):
        assert lifted_spans(facts, mode) == groups
        _, lifted = capture(model, ids, smooth=1, tail=0, gap=3, lifted=groups)
        outside = torch.ones(48, dtype=torch.bool)
        for group in groups:
            best = torch.cat([plain[:, start:stop] for start, stop in group], dim=1).amax(dim=1, keepdim=True)
            for start, stop in group:
                outside[start:stop] = False
                torch.testing.assert_close(lifted[:, start:stop], best.expand(-1, stop - start, -1))
            assert (torch.cat([plain[:, a:b] for a, b in group], dim=1) < best).any()  # the tokens did differ
        torch.testing.assert_close(lifted[:, outside], plain[:, outside])
    assert lifted_spans(facts, "off") == []
    with pytest.raises(Exception, match="span_targets"):
        TrainConfig(span_targets="key")


def test_statements_name_exactly_the_tokens_of_their_key_and_value(byte_tokenizer):
    ids, fact = encode_statement(byte_tokenizer, " Record: {key} -> {value}. ", "amber-falcon", "90210")
    text = byte_tokenizer.decode(ids)
    assert text == " Record: amber-falcon -> 90210. "
    assert byte_tokenizer.decode(ids[slice(*fact.key)]) == " amber-falcon"  # the space before it, nothing else
    assert byte_tokenizer.decode(ids[slice(*fact.value)]) == " 90210"
    pieces = [ids[: fact.key[0]], ids[fact.key[1] : fact.value[0]], ids[fact.value[1] :]]
    assert [byte_tokenizer.decode(piece) for piece in pieces] == [" Record:", " ->", ". "]  # the rest, exactly
    assert fact.statement == (fact.start, fact.stop) == (0, len(ids))
    ids, fact = encode_statement(byte_tokenizer, " {key}'s code is {value}.", "Orla", "AB-12")
    assert byte_tokenizer.decode(ids) == " Orla's code is AB-12." and fact.key[0] == 0
    assert [byte_tokenizer.decode(ids[slice(*span)]) for span in (fact.key, fact.value)] == [" Orla", " AB-12"]
    assert fact.shifted(3) == Fact((fact.key[0] + 3, fact.key[1] + 3), (fact.value[0] + 3, fact.value[1] + 3),
                                   (3, len(ids) + 3))


def test_training_on_spanned_sequences_reduces_the_loss(model):
    def sequences(seed: int):
        generator = torch.Generator().manual_seed(seed)
        while True:
            ids = torch.randint(0, VOCAB, (64,), generator=generator).tolist()
            start = int(torch.randint(4, 40, (1,), generator=generator))
            yield TrainingSequence(ids, [Fact((start, start + 2), (start + 4, start + 9), (start - 1, start + 10))],
                                   questions=48)

    config = TrainConfig(steps=25, seq_len=64, span_targets="fact", lr=3e-3, hidden=16, batch_tokens=128,
                         buffer_tokens=512, tail=8, gap=4, updates=4)  # the default targets: the questions' queries
    held_out = next(sequences(99))
    x, y = capture(model, torch.tensor([held_out.ids]), config.smooth, config.tail, config.gap,
                   lifted=lifted_spans(held_out.facts, "fact"), queries_from=48)
    start, _ = train_retaining_heads(model, sequences(0), TrainConfig(**{**vars(config), "steps": 1}))
    trained, losses = train_retaining_heads(model, sequences(0), config)
    with torch.no_grad():
        before, after = float(retaining_loss(start, x, y)), float(retaining_loss(trained, x, y))
    assert len(losses) == 25 and after < 0.7 * before


def test_spliced_needles_name_the_spans_of_their_keys_and_numbers(byte_tokenizer):
    encode = lambda text: byte_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = encode("The sky is blue. Here we go. There and back again. " * 40)
    found = 0
    for seed in range(10):
        sequence = corpus.synthetic_retrieval(byte_tokenizer, filler, 300, random.Random(seed))
        assert len(sequence.ids) == 300
        text = byte_tokenizer.decode(sequence.ids)
        for fact in sequence.facts:
            key, value = (byte_tokenizer.decode(sequence.ids[slice(*span)]) for span in (fact.key, fact.value))
            assert re.fullmatch(r" [a-z]+(-[a-z]+)?", key) and key.strip().split("-")[0] in corpus._NEEDLE_WORDS
            assert re.fullmatch(r" \d{4,8}", value) and text.count(value) >= 1
            found += 1
    assert found >= 10


def test_asking_all_asks_every_stated_fact_after_the_document(byte_tokenizer):
    """With ``ask_all`` every fact the sequence states is asked about, after ``questions``, where the document ends;
    without it the draws are those of before (the shipped heads' data stays reproducible)."""
    encode = lambda text: byte_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = encode("The sky is blue. Here we go. There and back again. " * 40)
    for seed in range(8):
        for sequence in (corpus.synthetic_retrieval(byte_tokenizer, filler, 400, random.Random(seed), ask_all=True),
                         prose_retrieval(byte_tokenizer, 600, random.Random(seed), ask_all=True)):
            document = byte_tokenizer.decode(sequence.ids[: sequence.questions])
            questions = byte_tokenizer.decode(sequence.ids[sequence.questions :])
            assert questions.startswith("\n") and "\n" not in document[-40:] and sequence.facts
            for fact in sequence.facts:
                assert fact.stop <= sequence.questions
                key, value = (byte_tokenizer.decode(sequence.ids[slice(*span)]).strip()
                              for span in (fact.key, fact.value))
                assert key in questions and value in questions
        single = corpus.synthetic_retrieval(byte_tokenizer, filler, 400, random.Random(seed))
        assert byte_tokenizer.decode(single.ids[single.questions :]).count("\n") == 1
    shifted = list(itertools.islice(corpus_sequences(byte_tokenizer, 300, synthetic=0.5, prose=0.5, ask_all=True), 4))
    assert all(s.questions is not None and byte_tokenizer.decode(s.ids[s.questions : s.questions + 1]) == "\n"
               for s in shifted)


def test_train_retaining_refuses_shares_above_one_in_one_line(tmp_path, capsys):
    from headspace.commands import main

    code = main(["train-retaining", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "h.safetensors"),
                 "--synthetic", "0.7", "--prose", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("headspace: error: ") and "add up to" in err[0]


def test_train_retaining_refuses_detrend_without_the_questions_in_one_line(tmp_path, capsys):
    from headspace.commands import main

    code = main(["train-retaining", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "h.safetensors"),
                 "--detrend", "--target-queries", "later"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("headspace: error: ") and "detrend" in err[0]
    assert not (tmp_path / "h.safetensors").exists()
