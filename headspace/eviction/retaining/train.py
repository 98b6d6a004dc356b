"""Training retaining heads: capture features and targets from the frozen model, fit the heads.

:func:`capture` runs the frozen model once over a sequence with an eager attention
function (:func:`capture_attention`, registered as ``"headspace_capture"``) that
records each layer's pre-RoPE q/k/v and the targets: per token, the largest
attention probability any later query (at least ``gap`` positions on; with
``TrainConfig.target_queries = "questions"``, only the queries of the questions
that end the sequence, as Locret) of the KV head's query group gives it.
:func:`train_retaining_heads` fits the heads on those with a replay buffer (see
:mod:`headspace.eviction.retaining.heads` for the design).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from headspace.errors import HeadspaceError
from headspace.eviction.retaining.corpus import Fact, Span, TrainingSequence, corpus_sequences
from headspace.eviction.retaining.heads import TARGET_EPS, HeadsSpec, RetainingHeads, RopeInverse
from headspace.shape import ModelShape

CAPTURE_ATTENTION = "headspace_capture"


# -- capturing features and targets from the frozen model ------------------------------------------------
@dataclass
class Capture:
    """What one forward pass of the frozen model yields per layer: features (N, F) and targets (N, Hk)."""

    rope: RopeInverse
    smooth: int = 3
    tail: int = 192
    gap: int = 64
    group_pool: str = "max"  # how a KV head's target pools its query group: "max" (Locret) or "mean"
    lifted: list[list[Span]] = field(default_factory=list)  # groups of spans kept or dropped together
    scale: str = "probability"  # "relative": each query's probabilities times the keys it sees (TrainConfig.targets)
    queries_from: int | None = None  # only queries from here on give targets, and only tokens before it are trained
    detrend: bool = False  # remove the targets' trend in distance to the questions (TrainConfig.detrend)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    targets: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            probs: torch.Tensor) -> None:
        batch, q_heads, length, _ = query.shape
        kv_heads = keys.shape[1]
        later = probs.tril(-self.gap)  # p(i, t) for queries i >= t + gap
        if self.queries_from is not None:
            later[:, :, : self.queries_from] = 0
        if self.scale == "relative":  # query i spreads over i + 1 keys: its share against a uniform one
            later *= torch.arange(1, length + 1, device=later.device, dtype=later.dtype)[:, None]
        best = later.amax(dim=2)  # (B, Hq, L): over queries
        grouped = best.view(batch, kv_heads, q_heads // kv_heads, length)
        best = grouped.amax(dim=2) if self.group_pool == "max" else grouped.mean(dim=2)  # over the query group
        if self.smooth > 1:
            best = F.max_pool1d(best, self.smooth, stride=1, padding=self.smooth // 2)
        for group in self.lifted:  # a fact is useful only whole: each of its tokens matters as its best one
            top = torch.stack([best[..., start:stop].amax(dim=-1) for start, stop in group]).amax(dim=0)
            for start, stop in group:
                best[..., start:stop] = top[..., None]
        target = torch.log(best + TARGET_EPS)
        keep = max(length - min(self.tail, length // 4), 1)  # leave out tokens with few later queries
        if self.queries_from is not None:
            keep = max(min(keep, self.queries_from), 1)
        if self.detrend:
            target = without_recency(target[..., :keep], self.queries_from)
        q, k = self.rope(query, 0), self.rope(keys, 0)
        x = RetainingHeads.features(q, k, values)[:, :keep]
        self.features[layer] = x.reshape(-1, x.shape[-1]).detach()
        self.targets[layer] = target.transpose(1, 2)[:, :keep].reshape(-1, kv_heads).detach()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers = sorted(self.features)
        return (torch.stack([self.features[i] for i in layers]), torch.stack([self.targets[i] for i in layers]))


def without_recency(target: torch.Tensor, questions: int) -> torch.Tensor:
    """``target`` (..., T), the log targets of the T tokens before the questions that begin at ``questions``, less
    their least-squares line in the log of each token's distance to the questions (the mean is kept).

    A question's attention decays with distance, so its targets rise towards the end of the document whatever the
    tokens say, and heads trained on them score late tokens higher: compressing a document chunk by chunk, late
    filler then outbids the earliest facts (:attr:`TrainConfig.detrend`).
    """
    distance = questions - torch.arange(target.shape[-1], device=target.device, dtype=target.dtype)
    x = distance.log()
    x = x - x.mean()
    slope = (target * x).sum(-1, keepdim=True) / x.square().sum().clamp_min(1e-12)
    return target - slope * x


_capture: ContextVar[Capture | None] = ContextVar("headspace_capture", default=None)


def capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager causal attention that also hands q/k/v and the probabilities to the active :class:`Capture`."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    logits = (query.float() @ k.float().transpose(-1, -2)) * scaling
    q_pos = torch.arange(key.shape[2] - length, key.shape[2], device=query.device)[:, None]
    k_pos = torch.arange(key.shape[2], device=query.device)[None]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).contiguous()
    capture = _capture.get()
    if capture is not None and query.shape[2] == key.shape[2] and sliding_window is None:
        capture.add(module.layer_idx, query, key, value, probs)  # full-attention layers: the ones eviction budgets
    return out, None


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, lambda *args, **kwargs: None)


@torch.no_grad()
def capture(model: PreTrainedModel, ids: torch.Tensor, smooth: int = 3, tail: int = 192, gap: int = 64,
            rope: RopeInverse | None = None, group_pool: str = "max",
            lifted: list[list[Span]] | None = None, scale: str = "probability",
            queries_from: int | None = None, detrend: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen ``model`` on ``ids`` (1, L); return features (layers, N, F) and targets (layers, N, Hk)
    of its full-attention layers (``ModelShape.full_attention_layers``, in order): sliding-window layers
    keep their window and are never scored, so they are not trained. Each group of ``lifted`` spans
    (start, stop), such as a fact's key and value (:func:`lifted_spans`), gets the group's largest
    target on every one of its tokens: kept whole or not at all. ``scale``: :attr:`TrainConfig.targets`.
    ``queries_from``: only queries at or after this position (the questions) give targets, and only the tokens
    before it (the document) are returned. ``detrend`` (needs ``queries_from``): :func:`without_recency`."""
    if detrend and queries_from is None:
        raise HeadspaceError("detrend removes the trend in distance to the questions: it needs queries_from")
    state = Capture(rope or RopeInverse(model), smooth, tail, gap, group_pool, list(lifted or []), scale=scale,
                    queries_from=queries_from, detrend=detrend)
    previous = model.config._attn_implementation
    token = _capture.set(state)
    try:
        model.set_attn_implementation(CAPTURE_ATTENTION)
        model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        _capture.reset(token)
        model.set_attn_implementation(previous)
    return state.stacked()


# -- training ---------------------------------------------------------------------------------------------
LOSSES = ("smooth_l1", "mse")
GROUP_POOLS = ("max", "mean")
SPAN_TARGETS = ("off", "value", "fact", "statement")
TARGET_SCALES = ("probability", "relative")
TARGET_QUERIES = ("later", "questions")


def lifted_spans(facts: list[Fact], span_targets: str) -> list[list[Span]]:
    """The groups of spans whose tokens :func:`capture` lifts to the group's largest target.

    ``value``: each fact's value alone, so that a number is kept or dropped whole. ``fact``: each fact's
    key and value together: a question finds the value through the key (it repeats the key's words), so
    keeping the value's digits without the key that leads to them answers nothing, and the key's own
    target, the attention of the few queries that repeat it, ranks it below the value that every
    answer token copies from. ``statement``: each fact's whole sentence, with the words that relate the
    key to the value, which the answer's prefix repeats and through which it reaches the value. ``off``:
    none.
    """
    if span_targets == "value":
        return [[fact.value] for fact in facts]
    if span_targets == "fact":
        return [[fact.key, fact.value] for fact in facts]
    if span_targets == "statement":
        return [[fact.statement] for fact in facts]
    return []


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_retaining_heads` (all recorded in the saved file).

    Locret's recipe as options: ``loss`` (smooth L1, the paper's, or MSE) on the log
    targets; ``smoothness``, the weight of an MSE between the predictions of adjacent
    positions (Locret: 0.0025), which favours keeping or dropping a multi-token span
    whole; ``group_pool``, how a KV head's target pools its query group (max, the
    paper's, or mean); ``weight_decay`` of AdamW (0: plain Adam). ``smooth`` max-pools the
    targets over neighbouring tokens and ``gap`` skips the nearest later queries (see
    :mod:`headspace.eviction.retaining.heads`). The data: a ``synthetic`` share of needles
    spliced into offline text and a ``prose`` share of facts in generated prose (the rest
    plain text; :func:`~headspace.eviction.retaining.corpus.corpus_sequences`), with
    ``span_targets`` lifting the tokens of each stated fact to its largest target (:func:`lifted_spans`).
    ``targets``: the attention probabilities as they are (``probability``), or each query's times the number of
    keys it sees (``relative``, its share against a uniform one). A query late in a long sequence spreads over
    many keys, so with plain probabilities the targets, and the trained scores, fall with position, and at
    inference a late chunk's tokens lose the budget to early filler (on SmolLM2 the second 1K chunk scored
    lower than the first in 347 of 360 document-layers: benchmarks/results/cpu_locret_inference_smollm2.md).
    ``target_queries``: which queries give the targets: every later one (``later``), or only those of the
    questions and answers that end each training sequence (``questions``, Locret's: what a question needs is
    what the heads should keep, not what the document's own next sentences look back at). With
    ``questions``, every sequence must end in questions (``synthetic + prose = 1``) and each asks about every
    fact it states: a fact left unasked would be trained to be dropped, which no head can know in advance.
    ``detrend`` (with ``questions``): take out of each sequence's targets their trend in distance to the questions
    (:func:`without_recency`), so that where a token stands does not raise its score, only what it says.
    """

    steps: int = 120
    seq_len: int = 1024
    lr: float = 2e-3
    hidden: int = 32
    updates: int = 16
    batch_tokens: int = 2048
    buffer_tokens: int = 16384
    smooth: int = 3
    tail: int = 192
    gap: int = 64
    synthetic: float = 0.5
    prose: float = 0.5
    span_targets: str = "statement"  # benchmarks/results/cpu_span_targets_smollm2.md
    seed: int = 0
    loss: str = "smooth_l1"
    smoothness: float = 0.0
    group_pool: str = "max"
    weight_decay: float = 0.0
    targets: str = "probability"
    target_queries: str = "questions"  # benchmarks/results/h100_question_targets/
    detrend: bool = False  # off: no better on SmolLM2, no needle on Gemma 3 (benchmarks/results/h100_recipe_ablation/)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise HeadspaceError(f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.span_targets not in SPAN_TARGETS:
            raise HeadspaceError(f"span_targets must be one of {', '.join(SPAN_TARGETS)}, got '{self.span_targets}'")
        if self.targets not in TARGET_SCALES:
            raise HeadspaceError(f"targets must be one of {', '.join(TARGET_SCALES)}, got '{self.targets}'")
        if self.target_queries not in TARGET_QUERIES:
            raise HeadspaceError(f"target_queries must be one of {', '.join(TARGET_QUERIES)}, "
                                 f"got '{self.target_queries}'")
        if self.target_queries == "questions" and abs(self.synthetic + self.prose - 1) > 1e-9:
            raise HeadspaceError("target_queries 'questions' trains on sequences that end in questions: the "
                                 f"synthetic ({self.synthetic}) and prose ({self.prose}) shares must add up to 1")
        if self.detrend and self.target_queries != "questions":
            raise HeadspaceError("detrend removes the trend in distance to the questions: it needs "
                                 "target_queries 'questions'")
        if self.group_pool not in GROUP_POOLS:
            raise HeadspaceError(f"group_pool must be one of {', '.join(GROUP_POOLS)}, got '{self.group_pool}'")
        if not (0 <= self.synthetic and 0 <= self.prose and self.synthetic + self.prose <= 1):
            raise HeadspaceError(f"the synthetic ({self.synthetic}) and prose ({self.prose}) shares must be "
                                 "non-negative and add up to at most 1")
        if self.smoothness < 0 or self.weight_decay < 0:
            raise HeadspaceError(f"smoothness and weight_decay must be non-negative, got {self.smoothness} and "
                                 f"{self.weight_decay}")


def training_sequences(tokenizer, config: TrainConfig) -> Iterator[TrainingSequence]:
    """The offline corpus that ``config`` trains on (:func:`~headspace.eviction.retaining.corpus.corpus_sequences`),
    every fact asked when the targets come from the questions."""
    return corpus_sequences(tokenizer, config.seq_len, config.seed, config.synthetic, config.prose,
                            ask_all=config.target_queries == "questions")


def retaining_loss(heads: RetainingHeads, features: torch.Tensor, targets: torch.Tensor,
                   layers: list[int] | None = None, loss: str = "smooth_l1", smoothness: float = 0.0,
                   contiguous: int = 0) -> torch.Tensor:
    """Smooth L1 (or MSE) between predicted and target log-importance, averaged over layers, tokens and heads,
    for ``features`` of ``layers`` (default: every layer); plus ``smoothness`` times the MSE between the
    predictions of adjacent positions among the last ``contiguous`` rows, a span of consecutive tokens."""
    predicted = heads.forward_all(features.float(), layers)
    fit = (F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss)(predicted, targets.float())
    if smoothness > 0 and contiguous > 1:
        span = predicted[:, -contiguous:]
        fit = fit + smoothness * F.mse_loss(span[:, 1:], span[:, :-1])
    return fit


class ReplayBuffer:
    """Token rows (features, targets) from past sequences, kept up to ``capacity`` rows by random replacement."""

    def __init__(self, capacity: int, generator: torch.Generator, device: torch.device | str = "cpu"):
        self.capacity, self.generator, self.device = capacity, generator, torch.device(device)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device, torch.float16), y.to(self.device, torch.float32)
        if self.x is None:
            self.x, self.y = x[:, : self.capacity].clone(), y[:, : self.capacity].clone()
            x, y = x[:, self.capacity :], y[:, self.capacity :]
        room = self.capacity - self.x.shape[1]
        if room > 0:
            self.x, self.y = torch.cat([self.x, x[:, :room]], 1), torch.cat([self.y, y[:, :room]], 1)
            x, y = x[:, room:], y[:, room:]
        if x.shape[1]:
            slots = torch.randint(0, self.capacity, (x.shape[1],), generator=self.generator).to(self.device)
            self.x[:, slots], self.y[:, slots] = x, y

    def sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, self.x.shape[1], (min(rows, self.x.shape[1]),), generator=self.generator)
        index = index.to(self.device)
        return self.x[:, index].float(), self.y[:, index]


def train_retaining_heads(
    model: PreTrainedModel,
    sequences: Iterable[torch.Tensor | TrainingSequence],
    config: TrainConfig | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[RetainingHeads, list[float]]:
    """Train retaining heads for the frozen ``model`` on ``config.steps`` sequences of token ids.

    Each step captures one sequence's features and targets, adds them to the replay
    buffer and makes ``config.updates`` Adam updates on buffer minibatches that always
    include some of the new sequence. Returns the heads (on CPU) and the loss per step.
    """
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = model.device
    heads = RetainingHeads(HeadsSpec.from_config(model.config, config.hidden)).to(device)
    layers = ModelShape.of(model.config).full_attention_layers
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(
            step / max(config.steps * config.updates, 1), 1.0))))
    buffer = ReplayBuffer(config.buffer_tokens, generator, device)
    rope = RopeInverse(model)
    model.requires_grad_(False)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="training retaining heads", unit="seq")
    iterator = iter(sequences)
    for step in range(config.steps):
        try:
            item = next(iterator)
        except StopIteration:
            break
        item = item if isinstance(item, TrainingSequence) else TrainingSequence(item)
        queries_from = None
        if config.target_queries == "questions":
            if item.questions is None:
                raise HeadspaceError("target_queries 'questions' needs training sequences that end in questions")
            queries_from = item.questions
        ids = torch.as_tensor(item.ids).reshape(1, -1)
        x, y = capture(model, ids, config.smooth, config.tail, config.gap, rope, config.group_pool,
                       lifted_spans(item.facts, config.span_targets), config.targets, queries_from, config.detrend)
        if step == 0:
            heads.mean[layers] = x.mean(dim=1)
            heads.std[layers] = x.std(dim=1).clamp_min(1e-3)
        buffer.add(x, y)
        fresh = min(max(config.batch_tokens // 4, 1), x.shape[1])
        total = 0.0
        for _ in range(config.updates):
            bx, by = buffer.sample(config.batch_tokens - fresh)
            if config.smoothness > 0:  # a span of consecutive tokens, for the term between neighbours
                first = int(torch.randint(0, x.shape[1] - fresh + 1, (1,), generator=generator))
                pick = torch.arange(first, first + fresh, device=device)
            else:
                pick = torch.randint(0, x.shape[1], (fresh,), generator=generator).to(device)
            bx, by = torch.cat([bx, x[:, pick].float()], 1), torch.cat([by, y[:, pick].float()], 1)
            loss = retaining_loss(heads, bx, by, layers, config.loss, config.smoothness, fresh)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        losses.append(total / config.updates)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
        if on_step is not None:
            on_step(step, losses[-1])
    if bar is not None:
        bar.close()
    return heads.cpu().eval(), losses


def train_command(argv: list[str] | None = None) -> str:
    """The command line that reproduces a run (recorded in the saved file)."""
    return " ".join(["headspace", *(argv if argv is not None else sys.argv[1:])])
