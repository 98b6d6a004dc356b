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
  matmul. With SmolLM2-135M (F = 960) and ``hidden=32`` that is about 1M parameters
  (its shipped heads: ``hidden=128``, about 3.7M).
* **Target**: for token t, layer l, KV head h: ``max`` over the queries of the questions
  and answers that end the training sequence (``target_queries="questions"``, Locret's;
  ``"later"``: every later query) at i >= t + gap, and the query heads of h's group, of
  the attention probability p(i, t) computed by the frozen model. From the questions
  alone, the targets rank what a later question reads, not what the document's own next
  sentences look back at (on SmolLM2, 8x answers after compression went from 18-26% to
  29-35% on varied documents: benchmarks/results/h100_question_targets/). The ``gap``
  (64) drops the next few queries: nearly every token is
  attended strongly by its immediate successors (local attention), which would make
  every token look important, while eviction only matters once a token has left the
  stabilizer window of recent tokens that is always kept. The max is max-pooled over
  ``smooth`` neighbouring tokens (so spans such as multi-token numbers are kept
  whole) and mapped to ``log(p + 1e-4)``. Where the training data knows a fact's
  tokens (a needle or a fact stated in its prose), ``span_targets`` lifts them: every
  token of the value (``value``), of the key and the value together (``fact``), or of
  the whole sentence that states them (``statement``, the default) gets their largest
  target. A number is useful only whole, and only with the key through which a question
  finds it, so they are kept or dropped together. The last
  ``tail`` positions of a training sequence are left out of the loss: too few later
  queries exist there for the max to mean anything.
* **Loss**: smooth L1 on the log targets, averaged over layers and KV heads (MSE as an
  option), plus, as an option, Locret's smoothness term: the MSE between the predictions
  of adjacent positions, weighted (the paper: 0.0025).
* **Layers**: only full-attention layers are trained and scored; sliding-window layers
  (Gemma 3's five in six) keep their window and have untrained rows in the file.

Training recipe (what ``headspace train-retaining`` runs): the backbone is frozen;
one training sequence per step is run through it with an eager attention function
(:func:`capture_attention`) that records the features and targets; the tokens go to
a replay buffer, and each step makes ``updates`` Adam updates on random buffer
minibatches. The sequences (:mod:`headspace.eviction.retaining.corpus`): offline
English text (docstrings of Python's standard library, license texts in
``/usr/share/common-licenses`` and copyright files under ``/usr/share/doc``); a
``synthetic`` share with 1-4 "needles" (a key and a number) spliced into that text; and a
``prose`` share of generated varied prose (five training-only grammars: a lab notebook,
a sports recap, a kitchen journal, a railway diary, a botanist's notes) stating 1-4 facts
once each (eight wordings; numbers of 4-9 digits, codes with letters, names); half
each by default. Both end in questions, each followed by its answer: about every fact
stated when the targets come from the questions (a fact no question asks would be
trained to be dropped, which no head can know while the document is read), about one
(needles) or 1-3 (prose) otherwise. The
prose teaches what the spliced needles could not: in varied text, where no sentence
stands out by its form, a fact stated once is still what a later question reads. Every
template is worded unlike the evaluation's, whose texts the heads never see.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from headspace.errors import HeadspaceError
from headspace.shape import ModelShape

FORMAT = "headspace-retaining-heads-v1"
TARGET_EPS = 1e-4
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


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
        shape = ModelShape.of(config)
        return cls(shape.model_type, shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim, shape.hidden_size,
                   hidden)

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

    def forward_all(self, x: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Scores of several layers at once (default every layer): ``x`` (layers, N, F) -> (layers, N, kv_heads)."""
        pick = slice(None) if layers is None else torch.tensor(layers, device=x.device)
        x = (x - self.mean[pick, None]) / self.std[pick, None]
        hidden = F.gelu(torch.baddbmm(self.b1[pick, None], x, self.w1[pick]))
        return torch.baddbmm(self.b2[pick, None], hidden, self.w2[pick])

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
def rotate_half(x: torch.Tensor) -> torch.Tensor:
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

    def rotation(self, start: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cosines and sines ``(count, d')`` the model rotates positions ``start..start+count-1`` by
        (``None`` for a model without RoPE): ``x * cos + rotate_half(x) * sin`` is RoPE at those positions."""
        if self.rotary is None:
            return None
        positions = torch.arange(start, start + count, device=device)[None]
        probe = torch.empty(0, device=device, dtype=torch.float32)
        cos, sin = self.rotary(probe, positions, **self.kwargs)
        return cos.float()[0], sin.float()[0]

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rotary is None:
            return x.float()
        cos, sin = self.rotation(start, x.shape[2], x.device)
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, c, d')
        rot = cos.shape[-1]
        x = x.float()
        head, tail = x[..., :rot], x[..., rot:]
        back = (head * cos - rotate_half(head) * sin) / (cos * cos + sin * sin)
        return torch.cat((back, tail), dim=-1) if tail.shape[-1] else back


_MEMO: dict[tuple, RetainingHeads] = {}


def cached_heads(heads: RetainingHeads | str | os.PathLike | None, model: PreTrainedModel) -> RetainingHeads:
    """:func:`resolve_heads` for ``model``, reading a file once for as long as the same file and model are used."""
    if isinstance(heads, RetainingHeads):
        return resolve_heads(heads, model.config, model.device)
    key = (str(heads), str(model.device), id(model.config))
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = resolve_heads(heads, model.config, model.device)
    return _MEMO[key]
