"""The documents of the questions-after-compression setting are framed as fairly as the question-inside prompts."""

from __future__ import annotations

import re

import pytest

from headspace import Engine
from headspace.evaluation.harness import EvalConfig, ModeSpec, documents_for, evaluate
from headspace.evaluation.tasks import make_document, make_sample

NEEDLE = re.compile(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.")


def test_a_shared_document_repeats_no_key_and_has_as_many_distractors_as_a_multikey_prompt(byte_tokenizer):
    """SmolLM2 under ``full`` answered other keys' questions with the numbers of a key three needles repeated."""
    document = make_document(byte_tokenizer, 2000, seed=0, depths=(0.1, 0.5, 0.9))
    needles = NEEDLE.findall(document.context)
    keys = [key for key, _ in needles]
    assert len(keys) == len(set(keys)) == 4
    inside = make_sample("niah_multikey", byte_tokenizer, 2000, seed=0, depth=0.5)
    assert len(NEEDLE.findall(inside.context)) == len(needles)
    asked = [q for q in document.questions if q.task in ("niah_single", "niah_multikey")]
    assert sorted(q.answers[0] for q in asked) == sorted(number for _, number in needles)
    for question in asked:  # each needle question's key is one of the document's, asked in the inside wording
        key = next(key for key, number in needles if number == question.answers[0])
        assert question.question == inside.question.replace(inside.question.split("for ")[1].split()[0], key)


def test_a_document_opens_with_the_instruction_of_each_task_it_holds(byte_tokenizer):
    intro = {task: make_sample(task, byte_tokenizer, 2000, seed=0, depth=0.5).prompt.split("\n")[0]
             for task in ("niah_single", "variable_tracking")}
    both = make_document(byte_tokenizer, 2000, seed=0, tasks=("niah_single", "variable_tracking"))
    assert both.context.startswith(intro["niah_single"] + "\n" + intro["variable_tracking"] + "\n")
    assert "VAR " in both.context
    needles = make_document(byte_tokenizer, 2000, seed=0, tasks=("niah_single",))
    assert needles.context.startswith(intro["niah_single"] + "\n")
    assert intro["variable_tracking"] not in needles.context and "VAR " not in needles.context  # only what it asks
    assert [q.task for q in needles.questions] == ["niah_single"] * 4 and len(NEEDLE.findall(needles.context)) == 4


def test_the_multivalue_task_is_asked_of_its_inside_prompt(byte_tokenizer):
    config = EvalConfig(tasks=("niah_single", "niah_multivalue"), lengths=(2000,), depths=(0.5,),
                        haystacks=("noise", "varied"), settings=("after",))
    documents = documents_for(config, byte_tokenizer)
    assert [[q.task for q in d.questions] for d in documents] == [["niah_single"], ["niah_single"],
                                                                  ["niah_multivalue"], ["niah_multivalue"]]
    for document in documents[2:]:
        inside = make_sample("niah_multivalue", byte_tokenizer, 2000, seed=0, haystack=document.haystack)
        assert document.context == inside.context and document.questions[0].prompt == inside.prompt
    assert "niah_multivalue" not in {q.task for q in documents[0].questions}


@pytest.mark.slow
def test_smollm2_answers_a_kept_document_as_the_whole_prompt_text(smollm2):
    """The harness's ``full`` answers after compression are those of ``generate`` on the question's prompt as one
    text: the split between document and question changes no token on the real tokenizer."""
    model, tokenizer = smollm2
    config = EvalConfig(tasks=("niah_single", "niah_multikey"), lengths=(1000,), depths=(0.2, 0.8),
                        haystacks=("varied",), settings=("after",))
    results = evaluate(model, tokenizer, [ModeSpec("full", "full")], config, progress=False)
    engine = Engine(model, tokenizer, mode="full", keep_bytes=0)
    questions = [q for d in documents_for(config, tokenizer) for q in d.questions]
    assert len(results["records"]) == len(questions) == 3
    for question, record in zip(questions, results["records"]):
        whole = tokenizer(question.prompt)["input_ids"]
        split = tokenizer(question.context)["input_ids"] + tokenizer(question.question,
                                                                      add_special_tokens=False)["input_ids"]
        assert whole == split
        assert record["output"] == engine.generate(question.prompt, max_new_tokens=question.max_new_tokens).text
    assert sum(r["score"] for r in results["records"]) >= 2  # the answers are right, not just equal
