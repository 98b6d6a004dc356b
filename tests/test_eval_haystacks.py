"""Varied haystacks, the held-out prompt family, digits kept per answer, and documents asked several questions."""

from __future__ import annotations

import zlib

import pytest

from headspace.commands import main
from headspace.evaluation.harness import EvalConfig, samples_for
from headspace.evaluation.report import summarize
from headspace.evaluation.tasks import (
    HELDOUT_TASKS,
    TASKS,
    Sample,
    digit_score,
    digits_kept,
    make_document,
    make_sample,
)
from headspace.evaluation.texts import LOGBOOK, TOWN, SentenceStream
from headspace.eviction.retaining import corpus


class WordTokenizer:
    """Whitespace words hashed to ids."""

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": [zlib.crc32(w.encode()) % 256 for w in text.split()]}


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer()


def sentences(text: str) -> list[str]:
    return [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) > 3]


@pytest.mark.parametrize("grammar", [TOWN, LOGBOOK])
def test_sentence_streams_never_repeat_and_grow_by_prefix(grammar):
    stream = SentenceStream(grammar, "a")
    first = stream.take(50)
    many = stream.take(3000)
    assert many[:50] == first and len(set(many)) == 3000
    assert SentenceStream(grammar, "b").take(50) != first


def test_a_varied_haystack_repeats_no_sentence_where_noise_repeats_all(tokenizer):
    varied = make_sample("niah_single", tokenizer, 4000, seed=0, depth=0.5, haystack="varied")
    noise = make_sample("niah_single", tokenizer, 4000, seed=0, depth=0.5)
    assert varied.haystack == "varied" and varied.answers[0] in varied.prompt
    assert len(set(sentences(varied.context))) == len(sentences(varied.context)) > 200
    assert len(set(sentences(noise.context))) < 10
    assert varied.prompt == varied.context + varied.question and varied.question.startswith("\nWhat is")


def test_the_held_out_family_has_its_own_haystack_needles_and_question(tokenizer):
    for task in HELDOUT_TASKS:
        sample = make_sample(task, tokenizer, 3000, seed=0, depth=0.3, haystack="varied")
        assert sample.haystack == "logbook" and len(sample.answers) == 1 and len(sample.answers[0]) == 6
        assert sample.context.count("manifest number") == (3 if task == "heldout_multikey" else 1)
        assert "magic number" not in sample.prompt and "The grass is green" not in sample.prompt
        assert not set(sentences(sample.context)) & set(SentenceStream(TOWN, 0).take(5000))


def test_eval_texts_and_templates_are_disjoint_from_the_heads_training_data(tokenizer):
    training = "\n".join(corpus.stdlib_docstrings() + corpus.system_texts())
    samples = [make_sample(task, tokenizer, 2000, seed=1, depth=0.5, haystack="varied") for task in TASKS]
    for sample in samples:
        for sentence in sentences(sample.context)[:150]:
            assert sentence not in training, sentence
    train_phrases = {phrase.split("{key}")[0].strip() for template in corpus._NEEDLE_TEMPLATES for phrase in template}
    for sample in samples:
        assert not any(phrase and phrase in sample.prompt for phrase in train_phrases)
    for template in corpus._NEEDLE_TEMPLATES:
        assert not any(word in " ".join(template) for word in ("magic", "manifest", "vessel"))


def test_digits_kept_count_the_digits_in_place():
    assert digits_kept("69720", " 69210. The") == 3  # the torn answers
    assert digits_kept("15584", "15892") == 2 and digits_kept("58132", "is 58122") == 4
    assert digits_kept("58132", "58132") == 5 and digits_kept("58132", "no number") == 0
    assert digits_kept("58132", "7 and 58122 and 58130") == 4  # the best-matching number counts
    sample = Sample("niah_multivalue", 500, None, 0, "", ["1111111", "2222222", "3333333", "4444444"], 40)
    assert digit_score(sample, "1111111 and 2222222") == 0.5
    assert digit_score(sample, "1111111 and 2222299") == pytest.approx((1 + 5 / 7) / 4)
    assert digit_score(make_sample("variable_tracking", WordTokenizer(), 500, seed=0), "ABCDE") is None


def test_a_document_holds_every_fact_its_questions_ask(tokenizer):
    document = make_document(tokenizer, 3000, seed=0)
    assert [q.task for q in document.questions] == ["niah_single"] * 4 + ["niah_multikey", "variable_tracking"]
    assert len({q.answers[0] for q in document.questions}) == 6
    for question in document.questions:
        assert question.context == document.context and question.haystack == "varied"
        assert all(answer in document.context for answer in question.answers)
        assert len(tokenizer(question.prompt)["input_ids"]) <= 3000
    assert len(tokenizer(document.context)["input_ids"]) > 2500
    assert make_document(tokenizer, 3000, seed=0).context == document.context  # reproducible


def test_samples_cover_each_haystack_once_per_task_that_has_one(tokenizer):
    config = EvalConfig(tasks=TASKS, lengths=(400,), depths=(0.5,), haystacks=("noise", "varied"))
    seen = [(s.task, s.haystack) for s in samples_for(config, tokenizer)]
    assert seen.count(("niah_single", "noise")) == seen.count(("niah_single", "varied")) == 1
    assert [h for t, h in seen if t == "common_words"] == ["noise"]
    assert [h for t, h in seen if t in HELDOUT_TASKS] == ["logbook", "logbook"]


def test_the_held_out_family_is_reported_apart():
    records = [
        {"task": "niah_single", "length": 100, "depth": 0.5, "index": 0, "mode": "m", "score": 1.0, "digits": 1.0},
        {"task": "niah_single", "haystack": "varied", "length": 100, "depth": 0.5, "index": 0, "mode": "m",
         "score": 0.0, "digits": 0.4},
        {"task": "heldout_single", "haystack": "logbook", "length": 100, "depth": 0.5, "index": 0, "mode": "m",
         "score": 0.0, "digits": 0.5},
    ]
    rows = summarize(records)["rows"]
    assert rows["niah_single [varied] @100"]["m"] == 0.0 and rows["niah_single @100"]["m"] == 100.0
    assert rows["needle tasks (mean)"]["m"] == 100.0 and rows["needle tasks, varied haystack (mean)"]["m"] == 0.0
    assert rows["all tasks (mean)"]["m"] == 50.0  # the held-out family is not part of it
    assert rows["held-out family (mean)"]["m"] == 0.0 and rows["held-out digits kept (mean)"]["m"] == 50.0
    assert rows["needle digits kept (mean)"]["m"] == 70.0


def test_eval_cli_refuses_an_unknown_haystack(capsys):
    assert main(["eval", "--haystacks", "noise,sand"]) == 2
    assert "haystack" in capsys.readouterr().err


def test_eval_cli_takes_options_of_one_mode(capsys):
    from headspace.evaluation.harness import mode_specs

    specs = mode_specs(["locret", "snapkv"], [8], per_mode={"locret": {"pool": 3}}, heads="h")
    assert specs[0].options == {"compression": 8.0, "heads": "h", "pool": 3} and "pool" not in specs[1].options
    assert main(["eval", "--modes", "full,locret", "--option", "locret.pool=2"]) == 2
    assert "odd" in capsys.readouterr().err  # checked before the model loads
    assert main(["eval", "--modes", "full", "--option", "locret.pool=3"]) == 2
    assert "not evaluated" in capsys.readouterr().err
    assert main(["eval", "--option", "pool3"]) == 2
    assert "MODE.FIELD=VALUE" in capsys.readouterr().err
