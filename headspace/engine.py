"""The engine: chunked prefill, then token-by-token decode, over a cache chosen by mode.

A mode names an attention implementation and a cache factory. ``full`` is plain
transformers (SDPA and ``DynamicCache``), the reference every other mode is
checked against; ``offload`` is head-wise KV offloading. Other modes register
themselves with :func:`register_mode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

import headspace.attention  # noqa: F401  (registers the "headspace" attention function)
from headspace.cache import HeadspaceCache, offload_cache
from headspace.errors import HeadspaceError
from headspace.memory import auto_group_heads, check_host_ram, gib, plan


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def check_positions(config: PretrainedConfig, tokens: int, allow: bool) -> None:
    """Refuse ``tokens`` beyond the model's positions unless ``allow`` (the model may still cope, e.g. RoPE scaling)."""
    limit = max_positions(config)
    if limit and tokens > limit and not allow:
        raise HeadspaceError(
            f"{tokens:,} tokens exceed the model's {limit:,} positions; shorten the input or pass "
            f"allow_beyond_positions=True (--allow-beyond-positions) to run anyway")


@dataclass(frozen=True)
class Mode:
    """How a mode computes attention and which cache it builds for ``tokens`` positions."""

    name: str
    attention: str
    make_cache: Callable[[Engine, int], Cache]


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> None:
    MODES[mode.name] = mode


def _full_cache(engine: Engine, tokens: int) -> Cache:
    return DynamicCache(config=engine.model.config)


def _offload_cache(engine: Engine, tokens: int) -> Cache:
    config = engine.model.config
    group = engine.group_heads or auto_group_heads(config, tokens, engine.dtype, engine.gpu_heads)
    needs = plan(config, tokens, engine.dtype, "offload", engine.gpu_heads, group)
    # on a CPU-only run the "device" tier is host RAM too
    check_host_ram(needs.host_kv_bytes + (needs.device_kv_bytes if engine.device.type == "cpu" else 0))
    cache = offload_cache(config, engine.device, engine.dtype, engine.gpu_heads, group,
                          cpu_heads=engine.options.get("cpu_heads", 0))
    cache.reserve(tokens)
    return cache


def _hf_offload_cache(engine: Engine, tokens: int) -> Cache:
    if engine.device.type != "cuda":
        raise HeadspaceError("hf-offload (transformers' layer-wise offloading) needs a CUDA device")
    return DynamicCache(config=engine.model.config, offloading=True)


register_mode(Mode("full", "sdpa", _full_cache))
register_mode(Mode("offload", "headspace", _offload_cache))
# transformers' own layer-wise offloading, kept as a baseline for benchmarks
register_mode(Mode("hf-offload", "sdpa", _hf_offload_cache))


@dataclass
class Stats:
    """What a run cost: times, throughput and memory."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_device_bytes: int | None = None
    device_kv_bytes: int | None = None
    host_kv_bytes: int | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from the prefill logits; decode steps produce the rest
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        parts = [f"prefill {self.prompt_tokens} tok in {self.prefill_seconds:.2f} s "
                 f"({self.prefill_tokens_per_s:,.0f} tok/s)",
                 f"decode {self.new_tokens} tok at {self.decode_tokens_per_s:.1f} tok/s"]
        if self.peak_device_bytes is not None:
            parts.append(f"peak GPU {gib(self.peak_device_bytes)}")
        if self.device_kv_bytes is not None:
            parts.append(f"KV {gib(self.device_kv_bytes)} on device, {gib(self.host_kv_bytes or 0)} in host RAM")
        return " | ".join(parts)


@dataclass
class Generation:
    text: str | None
    token_ids: list[int]
    stats: Stats = field(default_factory=Stats)


def kv_bytes(cache: Cache) -> tuple[int, int]:
    """(device, host) bytes held by ``cache``."""
    if isinstance(cache, HeadspaceCache):
        return cache.device_kv_bytes, cache.host_kv_bytes
    device = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                device += tensor.numel() * tensor.element_size()
    return device, 0


class Engine:
    """Runs one model in one mode: ``prefill`` a prompt in chunks, ``generate`` text from it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer=None,
        mode: str = "offload",
        gpu_heads: int = 1,
        group_heads: int | None = None,
        chunk_size: int | None = None,
        allow_beyond_positions: bool = False,
        **options,
    ):
        if mode not in MODES:
            raise HeadspaceError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
        self.model, self.tokenizer, self.mode = model, tokenizer, MODES[mode]
        self.device, self.dtype = model.device, model.dtype
        self.gpu_heads, self.group_heads = gpu_heads, group_heads
        self.chunk_size = chunk_size or (4096 if self.device.type == "cuda" else 1024)
        if self.chunk_size < 1:
            raise HeadspaceError(f"chunk_size must be positive, got {self.chunk_size}")
        self.allow_beyond_positions = allow_beyond_positions
        self.options = options

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | torch.Tensor, chat: bool = False) -> torch.Tensor:
        """Token ids ``(1, n)`` on the model's device; text needs a tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise HeadspaceError("this model has no tokenizer: pass token ids instead of text")
            if not prompt.strip():
                raise HeadspaceError("the prompt is empty")
            if chat:
                prompt = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
            ids = torch.tensor([ids])
        else:
            ids = torch.as_tensor(prompt)
            if ids.dim() == 1:
                ids = ids[None]
        if ids.numel() == 0:
            raise HeadspaceError("the prompt is empty")
        return ids.to(self.device)

    def check_length(self, tokens: int) -> None:
        check_positions(self.model.config, tokens, self.allow_beyond_positions)

    # -- running --------------------------------------------------------------------------------
    def new_cache(self, tokens: int = 0) -> Cache:
        """A cache for this mode, with room reserved for ``tokens`` positions where the mode can use it."""
        self._use_attention()
        return self.mode.make_cache(self, tokens)

    def _use_attention(self) -> None:
        if self.model.config._attn_implementation != self.mode.attention:
            self.model.set_attn_implementation(self.mode.attention)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One step over ``ids`` with ``cache``; the last position's logits ``(batch, vocab)``."""
        self._use_attention()
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def prefill(
        self,
        ids: torch.Tensor | list[int],
        cache: Cache | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
        reserve: int = 0,
    ) -> tuple[torch.Tensor, Cache]:
        """Feed ``ids`` in chunks of ``chunk_size``; return the last token's logits and the cache.

        ``on_chunk(done, total)`` is called after every chunk (progress bars).
        """
        ids = self.encode(ids)
        total = ids.shape[1]
        self.check_length(max(total, reserve))
        self.prompt_tokens = total  # budgeted modes resolve compression against it and tell prefill from decode
        cache = cache if cache is not None else self.new_cache(max(total, reserve))
        logits = None
        for start in range(0, total, self.chunk_size):
            logits = self.forward(ids[:, start : start + self.chunk_size], cache)
            if on_chunk is not None:
                on_chunk(min(start + self.chunk_size, total), total)
        return logits, cache

    def generate(
        self,
        prompt: str | list[int] | torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_on_eos: bool = True,
        chat: bool = False,
        on_token: Callable[[int, str], None] | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Prefill ``prompt`` and decode up to ``max_new_tokens`` (greedy when ``temperature`` is 0).

        ``on_token(id, piece)`` gets each token with the text it completes; the pieces add up
        to the final text.
        """
        if max_new_tokens < 1:
            raise HeadspaceError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.encode(prompt, chat=chat)
        stats = Stats(prompt_tokens=ids.shape[1])
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        eos = self._eos_ids() if stop_on_eos else set()
        self._reset_peak()
        start = self._now()
        logits, cache = self.prefill(ids, on_chunk=on_chunk, reserve=ids.shape[1] + max_new_tokens)
        stats.prefill_seconds = self._now() - start
        tokens: list[int] = []
        text_so_far = ""
        start = self._now()
        while True:
            token = self._pick(logits, temperature, top_p, top_k, generator)
            tokens.append(token)
            done = token in eos or len(tokens) >= max_new_tokens
            if on_token is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
                # a multi-byte character split across tokens decodes as U+FFFD until complete: hold it back
                if done or not text.endswith("\ufffd"):
                    on_token(token, text[len(text_so_far):])
                    text_so_far = text
                else:
                    on_token(token, "")
            if done:
                break
            logits = self.forward(torch.tensor([[token]], device=self.device), cache)
        stats.decode_seconds = self._now() - start
        stats.new_tokens = len(tokens)
        stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        stats.device_kv_bytes, stats.host_kv_bytes = kv_bytes(cache)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else None
        return Generation(text, tokens, stats)

    # -- helpers --------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
              generator: torch.Generator | None) -> int:
        row = logits[0].float().cpu()
        if temperature <= 0:
            return int(row.argmax())
        row = row / temperature
        if top_k > 0:
            kth = torch.topk(row, min(top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs > top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# Eviction modes (locret, streamingllm, snapkv, random, offload+locret) register themselves on import.
import headspace.budget  # noqa: E402,F401
