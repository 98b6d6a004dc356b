"""Kept documents: prefill once, ask many questions, roll back, keep, save and load.

Every answer from a kept document is compared with a fresh run: for the exact modes
(``full``, ``offload``) with plain transformers over document + question in one forward
pass; for eviction modes with a fresh run of the same mode that prefills the document,
then the question (the same document-time evictions). Tiny random models of every
supported family, float32 on the CPU; the real SmolLM2 only in one test marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS, assert_informative, assert_logits_equal, build_model, max_diff, random_ids, tiny_config
from safetensors import safe_open

from headspace import Engine, HeadspaceError
from headspace.documents import files, snapshot
from headspace.documents.files import DocumentFile
from headspace.documents.store import DocumentStore
from headspace.eviction.budget import BudgetLayer
from headspace.eviction.retaining.heads import HeadsSpec, RetainingHeads
from headspace.kv.cache import kv_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

DOCUMENT = 50  # tokens: longer than every tiny sliding window
QUESTIONS = (5, 9, 13)  # question lengths
NEW = 8  # tokens answered per question
# exact modes: (mode, options, chunk size); no chunk size divides the document
EXACT = [
    ("full", {}, 7),
    ("offload", dict(gpu_heads=0, group_heads=1), 7),
    ("offload", dict(gpu_heads=1, group_heads=2), 16),
    ("offload", dict(gpu_heads=0, cpu_heads=1), 33),
    ("offload", dict(gpu_heads=2, group_heads=1), 33),  # every KV head on the device for the 2-head models
]
BUDGET = dict(budget=24, stabilizer=8, sink=2)  # evicts during the document, the question and the answer
EVICTION = [("locret", {}), ("locret", dict(prefill="chunked")), ("offload+locret", {}),
            ("offload+locret", dict(decode="exact")), ("snapkv", {}),
            ("streamingllm", {}), ("random", dict(seed=3)), ("locret", dict(merge=8)),
            ("locret", dict(once=True, merge=8)), ("offload+locret", dict(release=True, merge=8))]


def ids(length: int, seed: int) -> torch.Tensor:
    return random_ids(length, seed)[0]


def questions() -> list[torch.Tensor]:
    return [ids(n, seed=100 + n) for n in QUESTIONS]


class Recorder:
    """Records the logits of the last ``engine.prefill`` call (those the first answered token comes from)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch):
        self.logits = None
        prefill = engine.prefill

        def recording(*args, **kwargs):
            logits, cache = prefill(*args, **kwargs)
            self.logits = logits.clone()
            return logits, cache

        monkeypatch.setattr(engine, "prefill", recording)


def full_answer(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Plain transformers over ``tokens`` in one forward pass: the prompt's last logits and the greedy answer."""
    engine = Engine(model, mode="full", chunk_size=tokens.numel(), keep_bytes=0)
    logits, cache = engine.prefill(tokens)
    return logits, engine.decode(logits, cache, NEW, engine._sampling(NEW, 0.0, 1.0, 0, None), stop_on_eos=False)


def ask(engine: Engine, document, question, recorder: Recorder | None = None):
    generation = engine.ask(document, question, max_new_tokens=NEW, stop_on_eos=False)
    return (recorder.logits if recorder else None), generation


# -- item 1: answers from a kept document equal fresh runs -----------------------------------------------------

@pytest.mark.parametrize("mode,options,chunk", EXACT, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_exact_modes_answer_as_a_fresh_prefill(tiny_models, monkeypatch, arch, mode, options, chunk):
    model = tiny_models.model(arch)
    engine = Engine(model, mode=mode, chunk_size=chunk, keep_bytes=0, **options)
    recorder = Recorder(engine, monkeypatch)
    document_ids = ids(DOCUMENT, seed=1)
    document = engine.prefill_document(document_ids)
    answers = set()
    for question in questions() + questions()[:1]:  # the first one again: nothing of the others is left
        logits, generation = ask(engine, document, question, recorder)
        expected_logits, expected = full_answer(model, torch.cat([document_ids, question]))
        assert_informative(expected_logits)
        assert_logits_equal(logits, expected_logits)
        assert generation.token_ids == expected
        assert generation.stats.cached_tokens == DOCUMENT
        assert generation.stats.prompt_tokens == DOCUMENT + question.numel()
        assert document.cache.get_seq_length() == DOCUMENT  # rolled back
        answers.add(tuple(expected))
    assert len(answers) == len(QUESTIONS)  # each question has its own answer: agreeing with them means something


def retaining_heads(model) -> RetainingHeads:
    torch.manual_seed(1)
    return RetainingHeads(HeadsSpec.from_config(model.config, hidden=8))


def eviction_options(model, mode: str, options: dict) -> dict:
    return {**BUDGET, **options, **({"heads": retaining_heads(model)} if "locret" in mode else {})}


def same_evictions_answer(model, mode: str, options: dict, document_ids, question) -> tuple[torch.Tensor, list[int]]:
    """A fresh run of ``mode``: a new cache, the document prefilled, then the question, then the answer."""
    engine = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options)
    _, cache = engine.prefill(document_ids)
    logits, cache = engine.prefill(question, cache=cache)
    return logits, engine.decode(logits, cache, NEW, engine._sampling(NEW, 0.0, 1.0, 0, None), stop_on_eos=False)


@pytest.mark.parametrize("mode,options", EVICTION, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3", "qwen3"])
def test_eviction_modes_answer_as_a_fresh_run_with_the_same_evictions(tiny_models, monkeypatch, arch, mode, options):
    model = tiny_models.model(arch)
    options = eviction_options(model, mode, options)
    engine = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options)
    recorder = Recorder(engine, monkeypatch)
    document_ids = ids(60, seed=1)
    document = engine.prefill_document(document_ids)
    for question in questions() + questions()[:1]:
        logits, generation = ask(engine, document, question, recorder)
        expected_logits, expected = same_evictions_answer(model, mode, options, document_ids, question)
        assert torch.equal(logits, expected_logits)
        assert generation.token_ids == expected
    layers = [layer for layer in document.cache.layers if isinstance(layer, BudgetLayer)]
    assert layers and all(layer.stored == BUDGET["budget"] and layer.length == 60 for layer in layers)


@pytest.mark.parametrize("mode,options", [("offload", dict(gpu_heads=1)), ("locret", {}), ("offload+locret", {})])
def test_a_missing_rollback_is_detected(tiny_models, monkeypatch, mode, options):
    """Without rolling back, the second question sees the first one and its answer, and the comparison fails."""
    model = tiny_models.model("llama")
    if mode != "offload":
        options = eviction_options(model, mode, options)
    engine = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options)
    recorder = Recorder(engine, monkeypatch)
    document_ids = ids(60, seed=1)
    document = engine.prefill_document(document_ids)
    first, second = questions()[:2]
    monkeypatch.setattr(snapshot.Snapshot, "restore", lambda self, cache: None)
    ask(engine, document, first)
    logits, _ = ask(engine, document, second, recorder)
    reference = (full_answer(model, torch.cat([document_ids, second])) if mode == "offload"
                 else same_evictions_answer(model, mode, options, document_ids, second))[0]
    assert max_diff(logits, reference) > 1e-2


def test_a_question_beyond_the_positions_is_refused_before_any_work(tiny_models, monkeypatch):
    model = tiny_models.model("llama")  # 256 positions
    engine = Engine(model, mode="offload", chunk_size=16, keep_bytes=0)
    document = engine.prefill_document(ids(200, seed=1))
    monkeypatch.setattr(engine, "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(HeadspaceError, match="exceed the model's 256 positions"):
        engine.ask(document, ids(40, seed=2), max_new_tokens=20)
    assert document.cache.get_seq_length() == 200
    with pytest.raises(HeadspaceError, match="exceed"):
        engine.generate(ids(250, seed=2), max_new_tokens=10)


def test_a_document_from_another_engine_is_refused(tiny_models):
    model = tiny_models.model("llama")
    document = Engine(model, mode="offload", gpu_heads=1, keep_bytes=0).prefill_document(ids(20, seed=1))
    with pytest.raises(HeadspaceError, match="prefilled in mode 'offload'"):
        Engine(model, mode="full").ask(document, ids(3, seed=2))
    # where the heads live is not what the cache holds: another split asks the same document
    expected = Engine(model, mode="offload", gpu_heads=1, keep_bytes=0).ask(document, ids(3, seed=2)).token_ids
    assert Engine(model, mode="offload", gpu_heads=2, keep_bytes=0).ask(document, ids(3, seed=2)).token_ids == expected
    other = build_model(tiny_config("llama"), seed=99)
    with pytest.raises(HeadspaceError, match="another model"):
        Engine(other, mode="offload", gpu_heads=1).ask(document, ids(3, seed=2))
    with pytest.raises(HeadspaceError, match="cannot keep documents"):
        Engine(model, mode="hf-offload").prefill_document(ids(20, seed=1))


def test_chat_documents_close_the_turn_after_each_question(tiny_models, byte_tokenizer):
    """A chat document is the template's opening and the text; a question is followed by the template's end."""
    config = tiny_config("llama", vocab_size=len(byte_tokenizer))
    model = build_model(config, seed=5)
    engine = Engine(model, byte_tokenizer, mode="offload", chunk_size=16, keep_bytes=0)
    text, question = "Once upon a time there was a document.", " What is the pass key?"
    document = engine.prefill_document(text, chat=True)
    generation = engine.ask(document, question, max_new_tokens=NEW, stop_on_eos=False)
    question_ids = byte_tokenizer(question, add_special_tokens=False)["input_ids"]
    whole = document.tokens.tolist() + question_ids + document.suffix
    rendered = byte_tokenizer.apply_chat_template([{"role": "user", "content": text + question}], tokenize=False,
                                                  add_generation_prompt=True)
    assert byte_tokenizer.decode(whole) == rendered
    assert generation.token_ids == full_answer(model, torch.tensor(whole))[1]


# -- item 3: prefix reuse inside one engine --------------------------------------------------------------------

@pytest.mark.parametrize("mode,options", [("full", {}), ("offload", dict(gpu_heads=1, group_heads=1))])
def test_generate_reuses_a_kept_prefix_and_answers_the_same(tiny_models, mode, options):
    model = tiny_models.model("qwen2")
    engine = Engine(model, mode=mode, chunk_size=16, **options)
    document_ids = ids(DOCUMENT, seed=1)
    first, second, third = questions()
    engine.generate(torch.cat([document_ids, first]), max_new_tokens=NEW, stop_on_eos=False)
    for question, cached in ((second, DOCUMENT), (second, DOCUMENT + second.numel()), (third, DOCUMENT)):
        prompt = torch.cat([document_ids, question])
        generation = engine.generate(prompt, max_new_tokens=NEW, stop_on_eos=False)
        assert generation.stats.cached_tokens == cached  # the same prompt twice: wholly cached, with its logits
        assert generation.token_ids == full_answer(model, prompt)[1]
    unrelated = engine.generate(ids(40, seed=7), max_new_tokens=NEW, stop_on_eos=False)
    assert unrelated.stats.cached_tokens == 0
    assert len(engine.kept) == 2


def test_eviction_modes_reuse_only_a_whole_kept_prompt(tiny_models):
    model = tiny_models.model("llama")
    engine = Engine(model, mode="locret", chunk_size=16, **eviction_options(model, "locret", {}))
    document_ids, (first, second, _) = ids(60, seed=1), questions()
    engine.generate(document_ids, max_new_tokens=NEW, stop_on_eos=False)
    longer = torch.cat([document_ids, first])
    assert engine.generate(longer, max_new_tokens=NEW, stop_on_eos=False).stats.cached_tokens == 60
    # the kept prompt is now document + first: document + second shares only part of it
    assert engine.generate(torch.cat([document_ids, second]), max_new_tokens=NEW,
                           stop_on_eos=False).stats.cached_tokens == 0


def test_kept_prompts_never_exceed_the_byte_budget(tiny_models, monkeypatch):
    model = tiny_models.model("llama")
    probe = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=0)
    entry = sum(kv_bytes(probe.prefill(ids(40, seed=0), reserve=40 + NEW)[1]))
    budget = int(2.5 * entry)
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=budget)
    put = DocumentStore.put
    seen = []

    def checked_put(store, document):
        put(store, document)
        seen.append(len(store))
        assert store.nbytes <= budget

    monkeypatch.setattr(DocumentStore, "put", checked_put)
    prompts = [ids(40, seed=s) for s in range(5)]
    for prompt in prompts:
        engine.generate(prompt, max_new_tokens=NEW, stop_on_eos=False)
    assert max(seen) == 2 and engine.kept.nbytes <= budget
    reuse = [engine.generate(torch.cat([prompt, ids(3, seed=9)]), max_new_tokens=2).stats.cached_tokens
             for prompt in (prompts[4], prompts[0])]
    assert reuse == [40, 0]  # the newest is kept, the oldest was dropped
    tight = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=entry // 2)
    tight.generate(prompts[0], max_new_tokens=NEW)
    assert len(tight.kept) == 0  # one prompt alone is over the budget: not kept


def test_kept_prompts_are_dropped_before_a_cache_that_needs_their_memory(tiny_models, monkeypatch):
    model = tiny_models.model("llama")
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16)
    for seed in range(3):
        engine.generate(ids(40, seed=seed), max_new_tokens=2)
    assert len(engine.kept) == 3
    kept_at_allocation = []
    make_cache = engine.mode.make_cache
    engine.mode = dataclasses.replace(
        engine.mode, make_cache=lambda request: kept_at_allocation.append(len(engine.kept)) or make_cache(request))
    short = {"left": 2}  # the memory is short until two kept prompts are dropped

    def shortfall(*args):
        short["left"] -= 1
        return "host RAM" if short["left"] >= 0 else None

    monkeypatch.setattr("headspace.documents.store.memory_shortfall", shortfall)
    engine.generate(ids(40, seed=10), max_new_tokens=2)
    assert kept_at_allocation == [1]
    assert len(engine.kept) == 2  # the one left and the new prompt


# -- item 2: save and load -------------------------------------------------------------------------------------

SAVED_MODES = [("full", {}), ("offload", dict(gpu_heads=1, group_heads=1)), ("offload", dict(gpu_heads=0)),
               ("locret", {}), ("offload+locret", {}), ("random", dict(seed=3)), ("locret", dict(once=True, merge=8)),
               ("offload+locret", dict(release=True, merge=8))]


@pytest.mark.parametrize("mode,options", SAVED_MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-sliding"])
def test_a_loaded_document_answers_as_the_saved_one(tiny_models, monkeypatch, tmp_path, arch, mode, options):
    model = tiny_models.model(arch)
    if mode in ("locret", "offload+locret", "random"):
        options = eviction_options(model, mode, options)
    engine = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options)
    recorder = Recorder(engine, monkeypatch)
    document = engine.prefill_document(ids(60, seed=1))
    path = tmp_path / "doc.hsc"
    size = engine.save(document, path)
    assert size == path.stat().st_size and not list(tmp_path.glob(".*partial"))
    loaded = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options).load(path)
    assert torch.equal(loaded.tokens, document.tokens) and torch.equal(loaded.logits, document.logits)
    assert kv_bytes(loaded.cache)[1] == kv_bytes(document.cache)[1]
    for question in questions():
        expected_logits, expected = ask(engine, document, question, recorder)
        logits, generation = ask(engine, loaded, question, recorder)
        assert torch.equal(logits, expected_logits)
        assert generation.token_ids == expected.token_ids


def test_the_file_is_safetensors_with_the_manifest(tiny_models, tmp_path):
    model = tiny_models.model("llama")
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=0)
    document = engine.prefill_document(ids(40, seed=1))
    engine.save(document, tmp_path / "doc.hsc", model_name="tiny")
    with safe_open(tmp_path / "doc.hsc", "pt") as file:
        manifest = json.loads(file.metadata()["manifest"])
        host = file.get_tensor("layers.0.host.keys")
    assert manifest["format"] == files.FORMAT and manifest["mode"] == "offload"
    assert manifest["tokens"] == document.tokens.tolist() and manifest["model_name"] == "tiny"
    assert manifest["options"] == {"gpu_heads": 1, "gpu_memory": None, "group_heads": None, "cpu_heads": 0,
                                   "kv_dtype": "bf16"}
    assert [layer["kind"] for layer in manifest["layers"]] == ["offload", "offload"]
    keys = document.cache.layers[0].host.blocks[0][1]
    assert torch.equal(host, keys[:, :, :40])


def test_a_compressed_document_is_a_fraction_of_the_exact_one_on_disk(tiny_models, tmp_path):
    model = tiny_models.model("llama")
    document_ids = ids(240, seed=1)
    kv, data = {}, {}
    for mode, options in (("offload", dict(gpu_heads=1)), ("locret", dict(compression=8, stabilizer=8, sink=2))):
        if mode == "locret":
            options["heads"] = retaining_heads(model)
        engine = Engine(model, mode=mode, chunk_size=32, keep_bytes=0, **options)
        engine.save(engine.prefill_document(document_ids), tmp_path / f"{mode}.hsc")
        file = DocumentFile.open(tmp_path / f"{mode}.hsc")
        kv[mode] = sum(spec["data_offsets"][1] - spec["data_offsets"][0] for name, spec in file.tensors.items()
                       if name.endswith(("keys", "values")))
        data[mode] = file.nbytes - file.data_start
    assert kv["locret"] * 8 == kv["offload"]  # 30 of 240 tokens per head
    # each kept token also carries its position and score (12 bytes per head, 64 for its keys and values here)
    assert data["locret"] < data["offload"] / 8 * (1 + 12 / 64) + 1024


# -- item 4: nothing lost, nothing wrong -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """A document saved by an offload engine over the tiny Llama, and that engine."""
    model = tiny_models.model("llama")
    engine = Engine(model, mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=0)
    path = tmp_path_factory.mktemp("saved") / "doc.hsc"
    engine.save(engine.prefill_document(ids(60, seed=1)), path)
    return engine, path


def rewrite_manifest(path: Path, target: Path, change) -> None:
    """Copy ``path`` to ``target`` with its manifest changed by ``change(manifest)``, checksum and length kept
    right, so only the change itself can be refused."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    manifest = json.loads(header["__metadata__"]["manifest"])
    change(manifest)
    text = json.dumps(manifest, separators=(",", ":"))
    header["__metadata__"].update(manifest=text, manifest_crc32=f"{files.zlib.crc32(text.encode()):08x}")
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    target.write_bytes(data[:8] + raw + b" " * (length - len(raw)) + data[8 + length :])


def corrupt(path: Path, target: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    data_start = DocumentFile.open(path).data_start
    if how == "truncated":
        del data[-1000:]
    elif how == "flipped byte in the tensors":
        data[(data_start + len(data)) // 2] ^= 0x40
    elif how == "flipped byte in the manifest":
        data[data.index(b'tokens\\":[') + 10] ^= 0x01  # a digit of the first token id becomes another digit
    elif how == "header cut":
        del data[40:]
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [
    ("truncated", "is truncated: it holds"),
    ("flipped byte in the tensors", "is corrupted: layers.* fails its checksum"),
    ("flipped byte in the manifest", "is corrupted: its manifest fails its checksum"),
    ("header cut", "not a headspace document, or it is truncated"),
])
def test_damaged_files_are_refused(saved, tmp_path, how, message):
    engine, path = saved
    corrupt(path, tmp_path / "bad.hsc", how)
    with pytest.raises(HeadspaceError, match=message):
        engine.load(tmp_path / "bad.hsc")


@pytest.mark.parametrize("mode,chosen,newer", [("locret", {"prefill": "chunked"}, ("once", "merge", "prefill")),
                                               ("offload+locret", {}, ("once", "merge", "release"))])
def test_a_file_saved_before_newer_options_existed_loads_as_without_them(tiny_models, tmp_path, monkeypatch, mode,
                                                                          chosen, newer):
    model = tiny_models.model("llama")
    options = eviction_options(model, mode, chosen)
    engine = Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **options)
    recorder = Recorder(engine, monkeypatch)
    document = engine.prefill_document(ids(60, seed=1))
    engine.save(document, tmp_path / "doc.hsc")
    rewrite_manifest(tmp_path / "doc.hsc", tmp_path / "old.hsc",
                     lambda manifest: [manifest["options"].pop(key) for key in newer])
    loaded = engine.load(tmp_path / "old.hsc")
    question = questions()[0]
    expected = ask(engine, document, question, recorder)[1].token_ids
    assert ask(engine, loaded, question, recorder)[1].token_ids == expected
    with pytest.raises(HeadspaceError, match="saved with merge=0 and this engine has merge=8"):
        Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **{**options, "merge": 8}).load(tmp_path / "old.hsc")
    if mode == "locret":  # files from before the exact prefill were chunked: today's default engine says so
        defaults = {key: value for key, value in options.items() if key not in chosen}
        with pytest.raises(HeadspaceError,
                           match="saved with merge=0, prefill=chunked and this engine has merge=64, prefill=exact"):
            Engine(model, mode=mode, chunk_size=16, keep_bytes=0, **defaults).load(tmp_path / "old.hsc")


def test_foreign_files_are_refused(saved, tmp_path, tiny_models):
    engine, path = saved
    model = tiny_models.model("llama")
    cases = [
        (Engine(build_model(tiny_config("llama"), seed=42), mode="offload", gpu_heads=1), path,
         "saved from another model: same architecture, other weights"),
        (Engine(tiny_models.model("qwen2"), mode="offload", gpu_heads=1), path,
         "saved from another model: its .*kv_heads.* differ"),
        (Engine(build_model(tiny_config("llama"), seed=sum(map(ord, "llama"))).to(torch.bfloat16), mode="offload",
                gpu_heads=1), path, "holds a float32 cache but the model runs in bfloat16"),
        (Engine(model, mode="full"), path, "saved in mode 'offload' and this engine runs 'full'"),
        (engine, tmp_path / "none.hsc", "does not exist"),
    ]
    rewrite_manifest(path, tmp_path / "future.hsc", lambda manifest: manifest.update(format=files.FORMAT + 1))
    cases.append((engine, tmp_path / "future.hsc", "written by a newer headspace"))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, tmp_path / "plain.safetensors")
    cases.append((engine, tmp_path / "plain.safetensors", "not a headspace document"))
    for loader, file, message in cases:
        with pytest.raises(HeadspaceError, match=message):
            loader.load(file)
    # same engine, runtime-only options differ: loads, keeping the file's split of heads
    Engine(model, mode="offload", gpu_heads=1, group_heads=2, cpu_heads=1, keep_bytes=0).load(path)
    loaded = Engine(model, mode="offload", gpu_heads=2, keep_bytes=0).load(path)
    assert [layer.gpu_heads for layer in loaded.cache.layers if hasattr(layer, "gpu_heads")] == [1, 1]


def test_a_document_that_does_not_fit_the_memory_is_refused(saved, monkeypatch):
    engine, path = saved
    monkeypatch.setattr("headspace.placement.machine.psutil.virtual_memory",
                        lambda: type("Memory", (), {"available": 1000, "total": 2000})())
    monkeypatch.setattr(engine, "_make_cache", lambda *a, **k: pytest.fail("a cache was allocated"))
    with pytest.raises(HeadspaceError, match="not enough memory to load .*host RAM: .* needed"):
        engine.load(path)


def test_gpu_memory_shortfall_is_named(monkeypatch):
    from headspace.placement import machine

    monkeypatch.setattr(machine, "probe", lambda device, weights: machine.Machine(10 * 2**20, 2**40))
    assert "GPU memory: 20.00 MiB needed" in machine.memory_shortfall(20 * 2**20, 0, torch.device("cuda"))
    assert machine.memory_shortfall(2**20, 0, torch.device("cuda")) is None


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import build_model, random_ids, tiny_config
from headspace import Engine
from headspace.documents import files

engine = Engine(build_model(tiny_config("llama"), seed=7), mode="offload", gpu_heads=1, chunk_size=16, keep_bytes=0)
document = engine.prefill_document(random_ids(120, seed=2)[0])
write, calls = files._write_all, []

def slow_write(fd, views):  # the header, then half of the tensors' first batch: then stall, to be killed mid-file
    calls.append(len(views))
    if len(calls) == 2:
        write(fd, views[: len(views) // 2])
        print("writing", flush=True)
        time.sleep(120)
    write(fd, views)

files._write_all = slow_write
engine.save(document, {path!r})
"""


@pytest.mark.parametrize("old_file", [True, False])
def test_a_save_killed_half_way_leaves_the_old_file_or_none(tmp_path, old_file):
    path = tmp_path / "doc.hsc"
    engine = Engine(build_model(tiny_config("llama"), seed=7), mode="offload", gpu_heads=1, chunk_size=16,
                    keep_bytes=0)
    old = engine.prefill_document(ids(60, seed=1))
    if old_file:
        engine.save(old, path)
    script = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"writing"
        partial = list(tmp_path.glob(".doc.hsc.*.partial"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # it really was half-way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    if old_file:
        loaded = engine.load(path)
        assert torch.equal(loaded.tokens, old.tokens)
        question = ids(5, seed=3)
        assert (engine.ask(loaded, question, max_new_tokens=NEW).token_ids
                == engine.ask(old, question, max_new_tokens=NEW).token_ids)
    else:
        assert not path.exists()
    with pytest.raises(HeadspaceError, match="truncated"):
        engine.load(partial[0])  # what the killed save left under its temporary name does not load


# -- the real SmolLM2 ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_answers_from_a_kept_and_a_loaded_document(smollm2, tmp_path):
    from headspace import passkey_prompt

    model, tokenizer = smollm2
    text = passkey_prompt(tokens=2000)
    document_text, question = text.rsplit("\n", 1)
    engine = Engine(model, tokenizer, mode="offload", gpu_heads=1, chunk_size=700, keep_bytes=0)
    document = engine.prefill_document(document_text)
    answer = engine.ask(document, "\n" + question, max_new_tokens=8)
    assert "68142" in answer.text
    question_ids = tokenizer("\n" + question, add_special_tokens=False)["input_ids"]
    whole = torch.cat([document.tokens, torch.tensor(question_ids)])
    reference = Engine(model, tokenizer, mode="full", keep_bytes=0).generate(whole, max_new_tokens=8)
    assert answer.token_ids == reference.token_ids
    engine.save(document, tmp_path / "doc.hsc")
    loaded = engine.load(tmp_path / "doc.hsc")
    assert engine.ask(loaded, "\n" + question, max_new_tokens=8).token_ids == answer.token_ids
