"""Retaining heads: small learned scorers that predict how much a token will matter later.

Locret (Huang et al. 2024, arXiv 2410.01805) attaches to every decoder layer a tiny
network that reads a token's own query, key and value and predicts, per KV head,
the token's *causal importance*: the largest attention probability any later query
of that head's query group gives it. Chunked prefill then keeps, per KV head, the
best-scored tokens within a fixed budget (see :mod:`headspace.budget`).

Design (this module's own implementation):

* **Input**: the concatenation of the token's queries (all query heads), key and
  value (all KV heads) of the layer, *before* RoPE. Keys and queries reach the
  cache already rotated, so :class:`RopeInverse` undoes the rotation (exactly, it
  is an orthogonal map per position). Pre-RoPE features describe *what* a token is,
  not *where* it is: a head trained on 1K-token sequences then scores tokens at
  position 8K from the same distribution, whereas rotated features at unseen
  positions would be out of distribution. Features are standardized per layer with
  statistics measured on the first training sequence.
* **Network**: per layer ``Linear(F, hidden) -> GELU -> Linear(hidden, kv_heads)``,
  all layers held as stacked tensors so training runs every layer in one batched
  matmul. With SmolLM2-135M (F = 960) and ``hidden=32`` that is about 1M parameters.
* **Target**: for token t, layer l, KV head h: ``max`` over later queries i >= t + gap
  and the query heads of h's group of the attention probability p(i, t) computed by
  the frozen model. The ``gap`` (64) drops the next few queries: nearly every token is
  attended strongly by its immediate successors (local attention), which would make
  every token look important, while eviction only matters once a token has left the
  stabilizer window of recent tokens that is always kept. The max is max-pooled over
  ``smooth`` neighbouring tokens (so spans such as multi-token numbers are kept
  whole) and mapped to ``log(p + 1e-4)``. The last
  ``tail`` positions of a training sequence are left out of the loss: too few later
  queries exist there for the max to mean anything.
* **Loss**: smooth L1 on the log targets, averaged over layers and KV heads.

Training recipe (what ``headspace train-retaining`` runs): the backbone is frozen;
one training sequence per step is run through it with an eager attention function
(:func:`capture_attention`) that records the features and targets; the tokens go to
a replay buffer, and each step makes ``updates`` Adam updates on random buffer
minibatches. Half the sequences are offline English text (docstrings of Python's
standard library, license texts in ``/usr/share/common-licenses`` and copyright
files under ``/usr/share/doc``), half synthetic retrieval tasks: 1-4 "needles"
(a key and a number, in templates deliberately worded unlike the evaluation's)
spliced into that text, followed by a question and its answer, so that the frozen
model's retrieval attention from the answer to the needle is part of the targets.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from headspace.errors import HeadspaceError

FORMAT = "headspace-retaining-heads-v1"
CAPTURE_ATTENTION = "headspace_capture"
TARGET_EPS = 1e-4
DATA_DIR = Path(__file__).parent / "data"


# -- architecture ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadsSpec:
    """What retaining heads are shaped for: the model's architecture and the MLP width."""

    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    hidden: int = 32

    @classmethod
    def from_config(cls, config: PretrainedConfig, hidden: int = 32) -> HeadsSpec:
        text = config.get_text_config(decoder=True)
        q_heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or q_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
        return cls(text.model_type, text.num_hidden_layers, q_heads, kv_heads, head_dim, text.hidden_size, hidden)

    @property
    def features(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    def architecture(self) -> dict[str, Any]:
        """The fields that must match a model for these heads to apply to it."""
        fields = asdict(self)
        fields.pop("hidden")
        return fields

    def check(self, config: PretrainedConfig, source: str = "these retaining heads") -> None:
        """Raise :class:`HeadspaceError` unless ``config`` has the architecture the heads were trained for."""
        other = HeadsSpec.from_config(config, self.hidden).architecture()
        mine = self.architecture()
        diff = {k: (mine[k], other[k]) for k in mine if mine[k] != other[k]}
        if diff:
            detail = ", ".join(f"{k} {a} (heads) vs {b} (model)" for k, (a, b) in diff.items())
            raise HeadspaceError(f"{source} were trained for another model: {detail}; "
                                 f"train heads for this model with `headspace train-retaining`")


class RetainingHeads(nn.Module):
    """One small MLP per decoder layer mapping a token's pre-RoPE [q, k, v] to a score per KV head."""

    def __init__(self, spec: HeadsSpec):
        super().__init__()
        self.spec = spec
        n, f, h, k = spec.layers, spec.features, spec.hidden, spec.kv_heads
        self.register_buffer("mean", torch.zeros(n, f))
        self.register_buffer("std", torch.ones(n, f))
        self.w1 = nn.Parameter(torch.randn(n, f, h) / math.sqrt(f))
        self.b1 = nn.Parameter(torch.zeros(n, h))
        self.w2 = nn.Parameter(torch.randn(n, h, k) / math.sqrt(h))
        self.b2 = nn.Parameter(torch.full((n, k), math.log(TARGET_EPS) / 2))

    @staticmethod
    def features(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, c, D)``, ``(B, Hk, c, D)`` x2 -> ``(B, c, (Hq + 2 Hk) D)`` in float32."""
        parts = [t.transpose(1, 2).flatten(2).float() for t in (query, keys, values)]
        return torch.cat(parts, dim=-1)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of every layer at once: ``x`` (layers, N, F) -> (layers, N, kv_heads)."""
        x = (x - self.mean[:, None]) / self.std[:, None]
        hidden = F.gelu(torch.baddbmm(self.b1[:, None], x, self.w1))
        return torch.baddbmm(self.b2[:, None], hidden, self.w2)

    def forward_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Scores of one layer: ``x`` (..., F) -> (..., kv_heads)."""
        x = (x - self.mean[layer]) / self.std[layer]
        hidden = F.gelu(x @ self.w1[layer] + self.b1[layer])
        return hidden @ self.w2[layer] + self.b2[layer]

    @torch.no_grad()
    def score(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Predicted log-importance ``(B, Hk, c)`` of c tokens from their pre-RoPE q/k/v."""
        x = self.features(query, keys, values).to(self.w1.device)
        return self.forward_layer(layer, x).transpose(1, 2)

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, recipe: dict | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write safetensors with the architecture (and the training recipe) in the metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": FORMAT, **{k: str(v) for k, v in asdict(self.spec).items()}}
        if recipe is not None:
            metadata["recipe"] = json.dumps(recipe, sort_keys=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, config: PretrainedConfig | None = None,
             device: torch.device | str = "cpu") -> RetainingHeads:
        """Read heads saved by :meth:`save`; with ``config``, refuse heads trained for another architecture."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HeadspaceError(f"retaining heads file '{path}' does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors raises its own types for corrupt files
            raise HeadspaceError(f"'{path}' is not a safetensors file of retaining heads ({error})") from error
        if metadata.get("format") != FORMAT:
            raise HeadspaceError(f"'{path}' holds no headspace retaining heads (format {metadata.get('format')!r})")
        spec = spec_from_metadata(metadata)
        if config is not None:
            spec.check(config, source=f"the retaining heads in '{path.name}'")
        heads = cls(spec)
        heads.load_state_dict({k: v.float() for k, v in tensors.items()})
        heads.recipe = json.loads(metadata["recipe"]) if "recipe" in metadata else None
        return heads.to(device).eval()


def spec_from_metadata(metadata: dict[str, str]) -> HeadsSpec:
    fields = {}
    for name, kind in HeadsSpec.__annotations__.items():
        if name not in metadata:
            raise HeadspaceError(f"retaining heads metadata lacks '{name}'")
        fields[name] = metadata[name] if kind == "str" else int(metadata[name])
    return HeadsSpec(**fields)


def shipped_heads(config: PretrainedConfig) -> Path | None:
    """The heads file shipped in ``headspace/data`` for this architecture, if any."""
    from safetensors import safe_open

    spec = HeadsSpec.from_config(config).architecture()
    for path in sorted(DATA_DIR.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            continue
        if spec_from_metadata(metadata).architecture() == spec:
            return path
    return None


def resolve_heads(heads: RetainingHeads | str | os.PathLike | None, config: PretrainedConfig,
                  device: torch.device) -> RetainingHeads:
    """Heads given as an object or a path, or the shipped file for ``config``; checked against ``config``."""
    if isinstance(heads, RetainingHeads):
        heads.spec.check(config)
        return heads.to(device).eval()
    if heads is None:
        found = shipped_heads(config)
        if found is None:
            spec = HeadsSpec.from_config(config)
            raise HeadspaceError(
                f"no retaining heads ship for this model ({spec.model_type}, {spec.layers} layers, "
                f"{spec.kv_heads} KV heads of {spec.head_dim}); train them with `headspace train-retaining "
                f"--model ... --out heads.safetensors` and pass heads=... (--heads)")
        heads = found
    return RetainingHeads.load(heads, config, device)


# -- RoPE -----------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeInverse:
    """Undo the model's rotary embedding on queries/keys ``(B, H, c, D)`` at positions ``start..start+c-1``.

    RoPE rotates each pair of dimensions (i, i + d/2) by a position-dependent angle,
    scaled by the rope type's attention factor; the inverse rotates back and divides
    by the squared factor. Partial rotary (only the first d' dims rotated) is honoured.
    """

    def __init__(self, model: PreTrainedModel):
        self.rotary = None
        self.kwargs: dict[str, Any] = {}
        for name, module in model.named_modules():
            if name.endswith("rotary_emb"):
                self.rotary = module
                break
        if self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters:
            self.kwargs["layer_type"] = "full_attention"

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rotary is None:
            return x.float()
        chunk = x.shape[2]
        positions = torch.arange(start, start + chunk, device=x.device)[None]
        probe = torch.empty(0, device=x.device, dtype=torch.float32)
        cos, sin = self.rotary(probe, positions, **self.kwargs)
        cos, sin = cos.float()[:, None], sin.float()[:, None]  # (1, 1, c, d')
        rot = cos.shape[-1]
        x = x.float()
        head, tail = x[..., :rot], x[..., rot:]
        back = (head * cos - _rotate_half(head) * sin) / (cos * cos + sin * sin)
        return torch.cat((back, tail), dim=-1) if tail.shape[-1] else back


# -- capturing features and targets from the frozen model ------------------------------------------------
@dataclass
class Capture:
    """What one forward pass of the frozen model yields per layer: features (N, F) and targets (N, Hk)."""

    rope: RopeInverse
    smooth: int = 3
    tail: int = 192
    gap: int = 64
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    targets: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            probs: torch.Tensor) -> None:
        batch, q_heads, length, _ = query.shape
        kv_heads = keys.shape[1]
        later = probs.tril(-self.gap)  # p(i, t) for queries i >= t + gap
        best = later.amax(dim=2)  # (B, Hq, L): over queries
        best = best.view(batch, kv_heads, q_heads // kv_heads, length).amax(dim=2)  # over the query group
        if self.smooth > 1:
            best = F.max_pool1d(best, self.smooth, stride=1, padding=self.smooth // 2)
        target = torch.log(best + TARGET_EPS)
        keep = max(length - min(self.tail, length // 4), 1)  # leave out tokens with few later queries
        q, k = self.rope(query, 0), self.rope(keys, 0)
        x = RetainingHeads.features(q, k, values)[:, :keep]
        self.features[layer] = x.reshape(-1, x.shape[-1]).detach()
        self.targets[layer] = target.transpose(1, 2)[:, :keep].reshape(-1, kv_heads).detach()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers = sorted(self.features)
        return (torch.stack([self.features[i] for i in layers]), torch.stack([self.targets[i] for i in layers]))


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
    if capture is not None and query.shape[2] == key.shape[2]:
        capture.add(module.layer_idx, query, key, value, probs)
    return out, None


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, lambda *args, **kwargs: None)


@torch.no_grad()
def capture(model: PreTrainedModel, ids: torch.Tensor, smooth: int = 3, tail: int = 192, gap: int = 64,
            rope: RopeInverse | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen ``model`` on ``ids`` (1, L); return features (layers, N, F) and targets (layers, N, Hk)."""
    state = Capture(rope or RopeInverse(model), smooth, tail, gap)
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
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_retaining_heads` (all recorded in the saved file)."""

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
    seed: int = 0


def retaining_loss(heads: RetainingHeads, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between predicted and target log-importance, averaged over layers, tokens and heads."""
    return F.smooth_l1_loss(heads.forward_all(features.float()), targets.float())


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
    sequences: Iterable[torch.Tensor],
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
    optimizer = torch.optim.Adam(heads.parameters(), lr=config.lr)
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
            ids = next(iterator)
        except StopIteration:
            break
        ids = torch.as_tensor(ids).reshape(1, -1)
        x, y = capture(model, ids, config.smooth, config.tail, config.gap, rope)
        if step == 0:
            heads.mean.copy_(x.mean(dim=1))
            heads.std.copy_(x.std(dim=1).clamp_min(1e-3))
        buffer.add(x, y)
        fresh = max(config.batch_tokens // 4, 1)
        total = 0.0
        for _ in range(config.updates):
            bx, by = buffer.sample(config.batch_tokens - fresh)
            pick = torch.randint(0, x.shape[1], (min(fresh, x.shape[1]),), generator=generator).to(device)
            bx, by = torch.cat([bx, x[:, pick].float()], 1), torch.cat([by, y[:, pick].float()], 1)
            loss = retaining_loss(heads, bx, by)
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


# -- training data ----------------------------------------------------------------------------------------
def stdlib_docstrings(limit_chars: int = 4_000_000) -> list[str]:
    """Docstrings (200+ characters) of the Python standard library's sources, read with ``ast``, never imported."""
    root = Path(os.__file__).parent
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc)
                    total += len(doc)
        if total >= limit_chars:
            break
    return texts


def system_texts(limit_chars: int = 2_000_000) -> list[str]:
    """License texts and package copyright files that Debian-like systems keep under /usr/share."""
    texts, seen, total = [], set(), 0
    paths = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    for path in paths:
        try:
            if not path.is_file() or path.stat().st_size > 200_000:
                continue
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        key = hash(text)
        if len(text) < 300 or key in seen:
            continue
        seen.add(key)
        texts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return texts


_NEEDLE_WORDS = ("amber", "falcon", "harbor", "quartz", "meadow", "lantern", "cobalt", "orchid", "glacier", "summit",
                 "velvet", "canyon", "ember", "willow", "saffron", "beacon", "tundra", "marble", "comet", "delta",
                 "juniper", "onyx", "prairie", "raven", "spruce", "topaz", "zephyr", "walnut", "indigo", "pebble")
_NEEDLE_TEMPLATES = (
    ("Please remember that the access code for {key} is {value}.", "What is the access code for {key}?",
     "The access code for {key} is {value}."),
    ("Record: {key} -> {value}.", "Which number was recorded for {key}?", "The number recorded for {key} is {value}."),
    ("Note: the locker of {key} opens with {value}.", "Which number opens the locker of {key}?",
     "The locker of {key} opens with {value}."),
    ("The id assigned to {key} is {value}.", "What id was assigned to {key}?", "The id assigned to {key} is {value}."),
)


def synthetic_retrieval(tokenizer, filler_ids: list[int], seq_len: int, rng: random.Random) -> list[int]:
    """A training sequence: needles spliced into ``filler_ids`` at sentence ends, then a question and its answer."""
    statement, question, answer = rng.choice(_NEEDLE_TEMPLATES)
    keys = rng.sample(_NEEDLE_WORDS, rng.randint(1, 4))
    keys = [f"{k}-{rng.choice(_NEEDLE_WORDS)}" if rng.random() < 0.5 else k for k in keys]
    values = [str(rng.randint(10 ** (n - 1), 10**n - 1)) for n in (rng.randint(4, 8) for _ in keys)]
    asked = rng.randrange(len(keys))
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needles = [encode(" " + statement.format(key=k, value=v) + " ") for k, v in zip(keys, values)]
    ending = encode("\n" + question.format(key=keys[asked]) + " " + answer.format(key=keys[asked], value=values[asked]))
    room = seq_len - len(ending) - sum(map(len, needles))
    body = list(filler_ids[: max(room, 0)])
    ends = [i + 1 for i, t in enumerate(body) if "." in tokenizer.decode([t])] or [len(body)]
    for needle in needles:
        at = rng.choice(ends)
        body[at:at] = needle
        ends = [e + len(needle) if e >= at else e for e in ends]
    return (body + ending)[-seq_len:]


def corpus_sequences(tokenizer, seq_len: int = 1024, seed: int = 0, synthetic: float = 0.5) -> Iterator[list[int]]:
    """Endless training sequences of ``seq_len`` tokens: offline text, and a ``synthetic`` share of retrieval tasks."""
    rng = random.Random(seed)
    texts = stdlib_docstrings() + system_texts()
    if not texts:
        raise HeadspaceError("no offline training text found (Python stdlib sources or /usr/share/doc)")
    rng.shuffle(texts)
    position = 0

    def take(tokens: int) -> list[int]:
        nonlocal position
        out: list[int] = []
        while len(out) < tokens:
            text = texts[position % len(texts)]
            position += 1
            out += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        return out[:tokens]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    while True:
        if rng.random() < synthetic:
            yield bos + synthetic_retrieval(tokenizer, take(seq_len), seq_len - len(bos), rng)
        else:
            yield bos + take(seq_len - len(bos))


def random_sequences(vocab_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random token sequences (for tiny random-weight models in tests)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab_size, (seq_len,), generator=generator)


def train_for_model(model_name: str, out: str | os.PathLike, config: TrainConfig | None = None,
                    device: str | None = None, progress: bool = True, command: str | None = None) -> Path:
    """Load ``model_name``, train its retaining heads on the offline recipe and save them to ``out``.

    What ``headspace train-retaining`` runs; the config and ``command`` go into the file's metadata.
    """
    from headspace.models import load_model

    config = config or TrainConfig()
    if config.steps < 1 or config.seq_len < 16 or config.lr <= 0:
        raise HeadspaceError("steps must be >= 1, seq-len >= 16 and lr > 0")
    model, tokenizer = load_model(model_name, device=device, dtype=torch.float32)
    if tokenizer is None:
        sequences: Iterable = random_sequences(model.config.vocab_size, config.seq_len, config.seed)
    else:
        sequences = corpus_sequences(tokenizer, config.seq_len, config.seed, config.synthetic)
    heads, losses = train_retaining_heads(model, sequences, config, progress=progress)
    recipe = {**asdict(config), "model": model_name, "final_loss": round(losses[-1], 5),
              "first_loss": round(losses[0], 5), "data": "stdlib docstrings + /usr/share licenses/copyright, "
              f"{config.synthetic:.0%} synthetic needle retrieval", "command": command or train_command()}
    return heads.save(out, recipe=recipe)


def train_command(argv: list[str] | None = None) -> str:
    """The command line that reproduces a run (recorded in the saved file)."""
    return " ".join(["headspace", *(argv if argv is not None else sys.argv[1:])])
