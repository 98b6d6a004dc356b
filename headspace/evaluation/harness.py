"""The harness: every sample under every mode, with greedy decoding, resumable from its JSON.

:func:`evaluate` runs every sample under every mode (a :class:`ModeSpec`: a registered
mode plus its options, such as ``locret`` at 4x compression), writing a JSON record
after each generation so an interrupted run resumes where it stopped;
:mod:`headspace.evaluation.report` summarizes the records.

Two settings (``EvalConfig.settings``), each record saying which:

* ``inside``: the question is part of the prompt that is prefilled and compressed
  (``Engine.generate`` on context + question), one sample per prompt;
* ``after``: a document holding several facts is prefilled and compressed once, before
  any question is seen (``Engine.prefill_document``), and then asked one question per
  fact (``Engine.ask``: the document is rolled back after each), the path a kept
  document takes in the API, the CLI and the server. The documents: per length, haystack
  and index, one with a needle at each depth, one more needle (``niah_multikey``) and a
  variable chain; one ship's log for the held-out family; and, each with its one
  question, the ``niah_multivalue`` and the common-words prompts of the inside setting.
  A query-aware mode (``snapkv-question``) runs here as what it becomes without the
  question: its window is the document's end, so it is query-agnostic SnapKV compressing
  once (the report notes it).

Framing: a document is plain text that opens with the instruction of each task it
holds; each question follows it on a new line and ends in its answer prefix, worded as in
the inside setting (``ask`` with the question's text, as a user of the API asks a kept
document; SmolLM2 does not answer these tasks through its chat template). A needle
question of a shared document is harder than the inside setting's ``niah_single``: the
document's other needles are its distractors (three with the default depths, as in the
inside ``niah_multikey``), so compare modes within a setting, and ``full`` across
settings only task by task. A key repeated by three needles (the multi-value task) was
the strongest distractor, which is why that task has its own document: in a shared one,
SmolLM2 under ``full`` answered the other keys' questions with its numbers (six documents
of 2K tokens, four needles each: 10/24 right with that key, 16/24 without).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headspace.engine.engine import Engine
from headspace.engine.modes import MODES
from headspace.errors import HeadspaceError
from headspace.evaluation.report import summarize
from headspace.evaluation.tasks import (
    DOCUMENT_TASKS,
    HAYSTACK_TASKS,
    HELDOUT_TASKS,
    MAX_NEW_TOKENS,
    TASKS,
    Document,
    Sample,
    digit_score,
    make_document,
    make_logbook,
    make_sample,
    score,
)
from headspace.eviction.policies import POLICIES
from headspace.shape import ModelShape


# -- modes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """A column of the results: a registered mode and its engine options."""

    label: str
    mode: str
    options: dict = field(default_factory=dict)


def mode_specs(modes: Sequence[str], compressions: Sequence[float] = (4, 8), budgets: Sequence[int] = (),
               per_mode: dict[str, dict] | None = None, **options) -> list[ModeSpec]:
    """``full``/``offload`` once each; every budgeted mode once per compression (``locret@4x``) and budget.

    ``options`` go to every budgeted mode (``heads`` to Locret's only); ``per_mode`` maps a mode to
    options of its own (``{"locret": {"pool": 3}}``).
    """
    per_mode = per_mode or {}
    unused = sorted(set(per_mode) - set(modes))
    if unused:
        raise HeadspaceError(f"options given for mode(s) {', '.join(unused)}, which are not evaluated")
    specs = []
    for mode in modes:
        if mode not in MODES:
            raise HeadspaceError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
        if not MODES[mode].budgeted:
            specs.append(ModeSpec(mode, mode))
            continue
        extra = {k: v for k, v in options.items() if v is not None and (k != "heads" or "locret" in mode)}
        extra.update(per_mode.get(mode, {}))
        for ratio in compressions:
            specs.append(ModeSpec(f"{mode}@{ratio:g}x", mode, {"compression": float(ratio), **extra}))
        for budget in budgets:
            specs.append(ModeSpec(f"{mode}@{budget}", mode, {"budget": int(budget), **extra}))
    return specs


# -- harness ----------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (4096,)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1
    seed: int = 0
    chunk_size: int = 1024
    haystacks: tuple[str, ...] = ("noise",)  # the main tasks' haystacks ("noise", "varied")
    # "inside" (the question in the compressed prompt) and/or "after" (documents asked after compression; the CLI
    # runs both by default)
    settings: tuple[str, ...] = ("inside",)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown or not self.settings:
            raise HeadspaceError(f"unknown or no setting(s) {unknown}; choose from {', '.join(SETTINGS)}")


SETTINGS = ("inside", "after")


def samples_for(config: EvalConfig, tokenizer) -> list[Sample]:
    """Every sample of the run: per length, task, haystack (tasks that have one), depth (single needles)."""
    out = []
    for length in config.lengths:
        for task in config.tasks:
            depths = config.depths if task in ("niah_single", "heldout_single") else (None,)
            haystacks = config.haystacks if task in HAYSTACK_TASKS else config.haystacks[:1]
            for haystack in haystacks:
                for depth in depths:
                    for index in range(config.samples):
                        out.append(make_sample(task, tokenizer, length, config.seed, index, depth, haystack))
    return out


def documents_for(config: EvalConfig, tokenizer) -> list[Document]:
    """Every document of the ``after`` setting, each with its questions among ``config.tasks``.

    Per length and index: per haystack, one shared document (:func:`make_document`) and, with
    ``niah_multivalue``, that task's question-inside prompt as a document of its own; the held-out
    family's ship's log; the common-words list.
    """
    out = []
    shared = tuple(task for task in DOCUMENT_TASKS if task in config.tasks)
    heldout = tuple(task for task in HELDOUT_TASKS if task in config.tasks)
    alone = [(task, haystack) for task in ("niah_multivalue", "common_words") if task in config.tasks
             for haystack in (config.haystacks if task in HAYSTACK_TASKS else config.haystacks[:1])]
    for length in config.lengths:
        for index in range(config.samples):
            if shared:
                out += [make_document(tokenizer, length, config.seed, index, haystack, config.depths, shared)
                        for haystack in config.haystacks]
            for task, haystack in alone:
                sample = make_sample(task, tokenizer, length, config.seed, index, haystack=haystack)
                out.append(Document(length, index, sample.haystack, sample.context, [sample]))
            if heldout:
                out.append(make_logbook(tokenizer, length, config.seed, index, config.depths, heldout))
    return out


def after_notes(specs: Sequence[ModeSpec]) -> list[str]:
    """What the report says about columns that run differently, or not at all, in the ``after`` setting."""
    notes = []
    for spec in specs:
        if not MODES[spec.mode].documents:
            notes.append(f"{spec.label}: not run after compression (its cache cannot keep a document)")
        elif spec.mode in POLICIES and POLICIES[spec.mode].query_aware:
            notes.append(f"{spec.label} [after]: compressed at the document's end before any question is seen, so "
                         f"its window is the document's last tokens: query-agnostic SnapKV, compressing once")
    return notes


def evaluate(model, tokenizer, specs: Sequence[ModeSpec], config: EvalConfig, out: str | Path | None = None,
             resume: bool = True, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run every sample under every mode; returns (and writes to ``out`` after each generation) the results."""
    if tokenizer is None:
        raise HeadspaceError("evaluation needs a model with a tokenizer")
    max_positions = ModelShape.of(model.config).max_positions
    for length in config.lengths:
        if max_positions and length + max(MAX_NEW_TOKENS.values()) > max_positions:
            raise HeadspaceError(f"length {length} plus the answer exceeds the model's {max_positions} positions")
    results = {"config": {**asdict(config), "modes": [asdict(s) for s in specs]}, "heads": _heads_used(model, specs),
               "records": []}
    path = Path(out) if out is not None else None
    done: dict[tuple, dict] = {}
    if path is not None and resume and path.exists():
        previous = json.loads(path.read_text())
        for record in previous.get("records", []):
            done[_record_key(record)] = record
    samples = samples_for(config, tokenizer) if "inside" in config.settings else []
    documents = documents_for(config, tokenizer) if "after" in config.settings else []
    engines = {s.label: Engine(model, tokenizer, mode=s.mode, chunk_size=config.chunk_size, keep_bytes=0,
                               **s.options) for s in specs}
    after_specs = [s for s in specs if MODES[s.mode].documents]
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(samples) * len(specs) + sum(len(d.questions) for d in documents) * len(after_specs)
        bar = tqdm(total=total, desc="evaluating", unit="run")

    def record(sample: Sample, spec: ModeSpec, setting: str, generation, seconds: float, **extra) -> None:
        entry = {"task": sample.task, "haystack": sample.haystack, "length": sample.length, "depth": sample.depth,
                 "index": sample.index, "mode": spec.label, "setting": setting, **extra,
                 "score": score(sample, generation.text), "digits": digit_score(sample, generation.text),
                 "output": generation.text, "answers": sample.answers,
                 "prompt_tokens": generation.stats.prompt_tokens, "cached_tokens": generation.stats.cached_tokens,
                 "seconds": round(seconds, 3), "device_kv_bytes": generation.stats.device_kv_bytes,
                 "host_kv_bytes": generation.stats.host_kv_bytes}
        results["records"].append(entry)
        if log is not None:
            log(f"{spec.label:>18} {setting:>6} {sample.task}/{sample.haystack} {sample.length} d={sample.depth} "
                f"#{sample.index}: {entry['score']:.2f} {generation.text!r}")
        if path is not None:
            _write(path, results)

    for sample in samples:
        for spec in specs:
            key = (*sample.key, spec.label, "inside")
            if key in done:
                results["records"].append(done[key])
            else:
                start = time.perf_counter()
                generation = engines[spec.label].generate(sample.prompt, max_new_tokens=sample.max_new_tokens)
                record(sample, spec, "inside", generation, time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
    for document in documents:
        for spec in after_specs:
            pending = []
            for question in document.questions:
                key = (*question.key, spec.label, "after")
                if key in done:
                    results["records"].append(done[key])
                    if bar is not None:
                        bar.update(1)
                else:
                    pending.append(question)
            if not pending:
                continue
            engine = engines[spec.label]
            start = time.perf_counter()
            kept = engine.prefill_document(document.context)  # once, before any question is seen
            prefill_seconds = round(time.perf_counter() - start, 3)
            for question in pending:
                start = time.perf_counter()
                generation = engine.ask(kept, question.question, max_new_tokens=question.max_new_tokens)
                record(question, spec, "after", generation, time.perf_counter() - start,
                       document_seconds=prefill_seconds)
                if bar is not None:
                    bar.update(1)
            del kept  # its cache is freed before the next document's is allocated
    if bar is not None:
        bar.close()
    results["notes"] = after_notes(specs) if documents else []
    results["table"] = summarize(results["records"], [s.label for s in specs], results["notes"])
    if path is not None:
        _write(path, results)
    return results


def _heads_used(model, specs: Sequence[ModeSpec]) -> dict:
    """Per Locret column, which retaining heads file it used and that file's training recipe."""
    from headspace.eviction.retaining.heads import RetainingHeads, shipped_heads

    used = {}
    for spec in specs:
        if "locret" not in spec.mode:
            continue
        heads = spec.options.get("heads")
        if isinstance(heads, RetainingHeads):
            used[spec.label] = {"path": None, "recipe": getattr(heads, "recipe", None)}
            continue
        path = heads or shipped_heads(model.config)
        recipe = RetainingHeads.load(path).recipe if path is not None else None
        used[spec.label] = {"path": Path(path).name if path is not None else None, "recipe": recipe}
    return used


def _record_key(record: dict) -> tuple:
    return (record["task"], record.get("haystack", "noise"), record["length"], record["depth"], record["index"],
            record["mode"], record.get("setting", "inside"))


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str))
    partial.replace(path)
