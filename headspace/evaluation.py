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

Prompts are plain completions ending in an answer prefix ("... The special magic
number for X mentioned in the provided text is"); SmolLM2-135M-Instruct answers the
needle tasks under ``full`` in that format but not through its chat template. Decoding
is greedy. A sample scores the share of its expected strings found in the output.

:func:`evaluate` runs every sample under every mode (a :class:`ModeSpec`: a registered
mode plus its options, such as ``locret`` at 4x compression), writing a JSON record
after each generation so an interrupted run resumes where it stopped; :func:`table`
and :func:`heatmap` summarize the records.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headspace.engine import MODES, Engine
from headspace.errors import HeadspaceError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
BUDGETED = ("locret", "streamingllm", "snapkv", "random", "offload+locret")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_WORDS = ("apple", "river", "candle", "forest", "silver", "window", "garden", "rocket", "violin", "castle",
             "pepper", "island", "thunder", "mirror", "basket", "dragon", "planet", "saddle", "ladder", "marble",
             "copper", "feather", "jungle", "kettle", "meadow", "needle", "orange", "pillow", "shadow", "tiger")
MAX_NEW_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "variable_tracking": 24,
                  "common_words": 48}


@dataclass
class Sample:
    task: str
    length: int  # requested prompt tokens
    depth: float | None
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int

    @property
    def key(self) -> tuple:
        return (self.task, self.length, self.depth, self.index)


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
    while count(build(high)) <= tokens:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if count(build(middle)) <= tokens:
            low = middle
        else:
            high = middle
    return build(low)


def _haystack(units: int, inserts: list[tuple[float, str]]) -> str:
    """``units`` noise sentences groups with ``inserts`` (depth, text) placed at their depths."""
    parts = [NOISE] * units
    for depth, text in sorted(inserts, key=lambda item: -item[0]):
        parts.insert(round(depth * units), text + " ")
    return "".join(parts)


_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.\n")


def make_sample(task: str, tokenizer, length: int, seed: int, index: int = 0, depth: float | None = None) -> Sample:
    """One sample of ``task`` with a prompt of at most ``length`` tokens, reproducible from its arguments."""
    if task not in TASKS:
        raise HeadspaceError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    used: set[str] = set()
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        key = _key(rng, used)
        depth = rng.random() if depth is None else depth
        if task == "niah_single":
            values = [_number(rng)]
            needles = [(depth, f"One of the special magic numbers for {key} is: {values[0]}.")]
        elif task == "niah_multikey":
            values = [_number(rng)]
            needles = [(depth, f"One of the special magic numbers for {key} is: {values[0]}.")]
            needles += [(rng.random(), f"One of the special magic numbers for {_key(rng, used)} is: {_number(rng)}.")
                        for _ in range(3)]
        else:
            values = [_number(rng) for _ in range(4)]
            needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {key} is: {v}.")
                       for i, v in enumerate(values)]
        plural = task == "niah_multivalue"
        question = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special "
                    f"magic numbers for {key} mentioned in the provided text are" if plural else
                    f"\nWhat is the special magic number for {key} mentioned in the provided text? The special "
                    f"magic number for {key} mentioned in the provided text is")
        prompt = _fit(lambda n: _NIAH_INTRO + _haystack(n, needles) + question, length, count)
        return Sample(task, length, depth if task != "niah_multivalue" else None, index, prompt, values,
                      MAX_NEW_TOKENS[task])
    if task == "variable_tracking":
        value = str(rng.randint(10_000, 99_999))
        names: list[str] = []
        while len(names) < 5:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in chain)
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
                    f"assigned the value {value}, they are:")
        prompt = _fit(lambda n: intro + _haystack(n, list(zip(depths, chain))) + question, length, count)
        return Sample(task, length, None, index, prompt, names, MAX_NEW_TOKENS[task])
    # common_words
    vocabulary = _words(rng, 600)
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
    return Sample(task, length, None, index, prompt, list(common), MAX_NEW_TOKENS[task])


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


# -- modes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """A column of the results: a registered mode and its engine options."""

    label: str
    mode: str
    options: dict = field(default_factory=dict)


def mode_specs(modes: Sequence[str], compressions: Sequence[float] = (4, 8), budgets: Sequence[int] = (),
               **options) -> list[ModeSpec]:
    """``full``/``offload`` once each; every budgeted mode once per compression (``locret@4x``) and budget."""
    specs = []
    for mode in modes:
        if mode not in MODES:
            raise HeadspaceError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
        if mode not in BUDGETED:
            specs.append(ModeSpec(mode, mode))
            continue
        extra = {k: v for k, v in options.items() if v is not None and (k != "heads" or "locret" in mode)}
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


def samples_for(config: EvalConfig, tokenizer) -> list[Sample]:
    out = []
    for length in config.lengths:
        for task in config.tasks:
            depths = config.depths if task == "niah_single" else (None,)
            for depth in depths:
                for index in range(config.samples):
                    out.append(make_sample(task, tokenizer, length, config.seed, index, depth))
    return out


def evaluate(model, tokenizer, specs: Sequence[ModeSpec], config: EvalConfig, out: str | Path | None = None,
             resume: bool = True, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run every sample under every mode; returns (and writes to ``out`` after each generation) the results."""
    if tokenizer is None:
        raise HeadspaceError("evaluation needs a model with a tokenizer")
    max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
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
    samples = samples_for(config, tokenizer)
    engines = {s.label: Engine(model, tokenizer, mode=s.mode, chunk_size=config.chunk_size, **s.options)
               for s in specs}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples) * len(specs), desc="evaluating", unit="run")
    for sample in samples:
        for spec in specs:
            key = (*sample.key, spec.label)
            if key in done:
                results["records"].append(done[key])
            else:
                start = time.perf_counter()
                generation = engines[spec.label].generate(sample.prompt, max_new_tokens=sample.max_new_tokens)
                record = {"task": sample.task, "length": sample.length, "depth": sample.depth,
                          "index": sample.index, "mode": spec.label, "score": score(sample, generation.text),
                          "output": generation.text, "answers": sample.answers,
                          "prompt_tokens": generation.stats.prompt_tokens,
                          "seconds": round(time.perf_counter() - start, 3),
                          "device_kv_bytes": generation.stats.device_kv_bytes,
                          "host_kv_bytes": generation.stats.host_kv_bytes}
                results["records"].append(record)
                if log is not None:
                    log(f"{spec.label:>18} {sample.task} {sample.length} d={sample.depth} #{sample.index}: "
                        f"{record['score']:.2f} {generation.text!r}")
                if path is not None:
                    _write(path, results)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    results["table"] = summarize(results["records"], [s.label for s in specs])
    if path is not None:
        _write(path, results)
    return results


def _heads_used(model, specs: Sequence[ModeSpec]) -> dict:
    """Per Locret column, which retaining heads file it used and that file's training recipe."""
    from headspace.retaining import RetainingHeads, shipped_heads

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
    return (record["task"], record["length"], record["depth"], record["index"], record["mode"])


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str))
    partial.replace(path)


# -- summaries --------------------------------------------------------------------------------------------
def summarize(records: list[dict], modes: Sequence[str] | None = None) -> dict:
    """Mean score (0-100) per (task, length) row and mode column, plus needle and overall averages."""
    modes = list(modes) if modes is not None else list(dict.fromkeys(r["mode"] for r in records))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        cells[(f"{r['task']} @{r['length']}", r["mode"])].append(r["score"])
        if r["task"] in NEEDLE_TASKS:
            cells[("needle tasks (mean)", r["mode"])].append(r["score"])
        cells[("all tasks (mean)", r["mode"])].append(r["score"])
    rows = list(dict.fromkeys(row for row, _ in cells if "(mean)" not in row))
    rows += [row for row in ("needle tasks (mean)", "all tasks (mean)") if any(k[0] == row for k in cells)]
    table = {row: {m: round(100 * sum(cells[(row, m)]) / len(cells[(row, m)]), 1) if cells.get((row, m)) else None
                   for m in modes} for row in rows}
    counts = {row: len(cells.get((row, modes[0]), [])) for row in rows}
    return {"modes": modes, "rows": table, "samples": counts}


def table(summary: dict) -> str:
    """A markdown table of :func:`summarize`'s output."""
    modes = summary["modes"]
    lines = ["| task @ tokens | n | " + " | ".join(modes) + " |", "|---|---:|" + "---:|" * len(modes)]
    for row, cells in summary["rows"].items():
        values = " | ".join("-" if cells[m] is None else f"{cells[m]:.1f}" for m in modes)
        lines.append(f"| {row} | {summary['samples'][row]} | {values} |")
    return "\n".join(lines)


def heatmap(records: list[dict], path: str | Path, modes: Sequence[str] | None = None) -> Path:
    """Single-needle score by depth (rows) and length (columns), one panel per mode, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = [r for r in records if r["task"] == "niah_single"]
    if not needle:
        raise HeadspaceError("no niah_single records to draw a heatmap from")
    modes = list(modes) if modes is not None else list(dict.fromkeys(r["mode"] for r in needle))
    depths = sorted({r["depth"] for r in needle})
    lengths = sorted({r["length"] for r in needle})
    cols = min(len(modes), 4)
    rows = (len(modes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 1.1 * len(lengths) * cols, 0.8 + 0.45 * len(depths) * rows),
                             squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        grid = [[None] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                hits = [r["score"] for r in needle if r["mode"] == mode and r["depth"] == depth
                        and r["length"] == length]
                grid[i][j] = sum(hits) / len(hits) if hits else float("nan")
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_title(mode, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    fig.supxlabel("prompt tokens", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
