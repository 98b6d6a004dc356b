"""Questions after compression: a document is prefilled and compressed once, then asked several questions."""

from __future__ import annotations

import json

import pytest
from conftest import assert_drawn, build_model, tiny_config

from headspace import Engine
from headspace.commands import main
from headspace.evaluation.harness import EvalConfig, ModeSpec, documents_for, evaluate
from headspace.evaluation.report import heatmap, table
from headspace.evaluation.tasks import make_document, make_logbook

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "heldout_single",
         "heldout_multikey", "common_words")


@pytest.fixture(scope="module")
def model(byte_tokenizer):
    config = tiny_config("llama", vocab_size=len(byte_tokenizer), max_position_embeddings=4096)
    return build_model(config, seed=3)


def config(settings, tasks=TASKS) -> EvalConfig:
    return EvalConfig(tasks=tasks, lengths=(2000,), depths=(0.2, 0.8), chunk_size=256, settings=settings)


def test_documents_hold_a_question_per_fact_of_every_task(byte_tokenizer):
    documents = documents_for(config(("after",)), byte_tokenizer)
    asked = [[q.task for q in d.questions] for d in documents]
    assert asked == [["niah_single", "niah_single", "niah_multikey", "variable_tracking"], ["niah_multivalue"],
                     ["common_words"], ["heldout_single", "heldout_single", "heldout_multikey"]]
    for document in documents:
        assert len({q.answers[0] for q in document.questions}) == len(document.questions)
        for question in document.questions:
            assert question.context == document.context and all(a in document.context for a in question.answers)
            assert len(byte_tokenizer(question.prompt)["input_ids"]) <= 2000
    assert [q.depth for q in documents[0].questions[:2]] == [0.2, 0.8]
    logbook = make_logbook(byte_tokenizer, 2000, seed=0, depths=(0.5,))
    assert logbook.haystack == "logbook" and "magic" not in logbook.context
    assert logbook.context.count("manifest number") == 2
    with pytest.raises(Exception, match="holds no task"):
        make_document(byte_tokenizer, 2000, seed=0, tasks=("common_words",))


def test_after_prefills_each_document_once_and_full_answers_as_with_the_question_inside(model, byte_tokenizer,
                                                                                       monkeypatch):
    prefills = []
    prefill = Engine.prefill

    def counting(self, ids, cache=None, **kwargs):
        prefills.append((self.mode.name, len(self.encode(ids)[0]), cache is None))
        return prefill(self, ids, cache=cache, **kwargs)

    monkeypatch.setattr(Engine, "prefill", counting)
    specs = [ModeSpec("full", "full"), ModeSpec("snapkv-question@4x", "snapkv-question", {"compression": 4.0})]
    settings = config(("after",), TASKS[:6])
    documents = documents_for(settings, byte_tokenizer)
    results = evaluate(model, byte_tokenizer, specs, settings, progress=False)
    records = results["records"]
    questions = [q for d in documents for q in d.questions]
    assert len(records) == len(questions) * len(specs) and {r["setting"] for r in records} == {"after"}
    for spec in specs:
        calls = [(tokens, fresh) for mode, tokens, fresh in prefills if mode == spec.mode]
        # one prefill per document, of the document's tokens, and one per question, of the question's only
        lengths = [len(byte_tokenizer(d.context)["input_ids"]) for d in documents]
        assert [tokens for tokens, fresh in calls if fresh] == lengths
        asked = [len(byte_tokenizer(q.question, add_special_tokens=False)["input_ids"]) for q in questions]
        assert [tokens for tokens, fresh in calls if not fresh] == asked
    full = [r for r in records if r["mode"] == "full"]
    budgeted = [r for r in records if r["mode"] != "full"]
    assert all(r["cached_tokens"] >= 1500 for r in full)
    assert all(b["device_kv_bytes"] < f["device_kv_bytes"] for f, b in zip(full, budgeted))
    engine = Engine(model, byte_tokenizer, mode="full", chunk_size=256, keep_bytes=0)
    outputs = set()
    for question, record in zip(questions, full):
        ids = (byte_tokenizer(question.context)["input_ids"]
               + byte_tokenizer(question.question, add_special_tokens=False)["input_ids"])
        inside = engine.generate(ids, max_new_tokens=question.max_new_tokens)
        assert record["output"] == inside.text and record["task"] == question.task
        outputs.add(inside.text)
    assert len(outputs) >= 3  # the answers differ from question to question: the comparison can fail


def test_both_settings_are_recorded_reported_apart_and_resumed(model, byte_tokenizer, tmp_path):
    specs = [ModeSpec("full", "full"), ModeSpec("hf-offload", "hf-offload"),
             ModeSpec("snapkv-question@4x", "snapkv-question", {"compression": 4.0}),
             ModeSpec("streamingllm@4x", "streamingllm", {"compression": 4.0, "stabilizer": 16})]
    specs = [s for s in specs if s.mode != "hf-offload"]  # needs CUDA; its note is checked below
    settings = config(("inside", "after"), ("niah_single", "heldout_single"))
    out = tmp_path / "eval.json"
    results = evaluate(model, byte_tokenizer, specs, settings, out=out, progress=False)
    records = results["records"]
    inside = [r for r in records if r["setting"] == "inside"]
    after = [r for r in records if r["setting"] == "after"]
    assert len(inside) == 4 * len(specs) and len(after) == 4 * len(specs)
    assert all(r["cached_tokens"] == 0 for r in inside) and all(r["cached_tokens"] > 0 for r in after)
    rows = results["table"]["rows"]
    for row in ("niah_single @2000", "niah_single @2000 [after]", "heldout_single @2000 [after]",
                "needle tasks (mean)", "needle tasks (mean) [after]", "held-out family (mean) [after]",
                "held-out digits kept (mean) [after]"):
        assert row in rows, row
    text = table(results["table"])
    assert "| niah_single @2000 [after] | 2 |" in text and "snapkv-question@4x [after]: compressed" in text
    assert json.loads(out.read_text())["records"] == records
    assert_drawn(heatmap(records, tmp_path / "after.png", setting="after"), min_width=150, min_height=100)
    calls = []
    again = evaluate(model, byte_tokenizer, specs, settings, out=out, progress=False, log=calls.append)
    assert calls == [] and again["records"] == records


def test_eval_cli_refuses_an_unknown_setting(capsys):
    assert main(["eval", "--settings", "inside,sideways"]) == 2
    assert "setting" in capsys.readouterr().err


def test_modes_that_cannot_keep_a_document_are_noted():
    from headspace.evaluation.harness import after_notes

    notes = after_notes([ModeSpec("hf-offload", "hf-offload"), ModeSpec("full", "full")])
    assert len(notes) == 1 and notes[0].startswith("hf-offload: not run after compression")


def test_eval_cli_runs_both_settings_and_draws_a_heatmap_for_each(model, byte_tokenizer, tmp_path, capsys,
                                                                 cpu_default_device):
    directory = tmp_path / "tiny"
    model.save_pretrained(directory)
    byte_tokenizer.save_pretrained(directory)
    out, png, markdown = tmp_path / "eval.json", tmp_path / "heat.png", tmp_path / "eval.md"
    assert main(["eval", "--model", str(directory), "--modes", "full", "--tasks", "niah_single", "--lengths", "2000",
                 "--depths", "0.5", "--chunk-size", "512", "--out", str(out), "--heatmap", str(png),
                 "--markdown", str(markdown)]) == 0
    printed = capsys.readouterr().out
    assert "| niah_single @2000 | 1 |" in printed and "| niah_single @2000 [after] | 1 |" in printed
    assert markdown.read_text().strip() == printed.strip()
    assert [r["setting"] for r in json.loads(out.read_text())["records"]] == ["inside", "after"]
    assert_drawn(png, min_width=100, min_height=100)
    assert_drawn(tmp_path / "heat_after.png", min_width=100, min_height=100)
