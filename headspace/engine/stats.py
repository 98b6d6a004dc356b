"""What a run produced and what it cost: :class:`Generation` and :class:`Stats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from transformers.cache_utils import Cache

from headspace.kv.cache import HeadspaceCache
from headspace.units import human_bytes


@dataclass
class Stats:
    """Times, throughput and memory of one generation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a kept document instead of being prefilled
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_device_bytes: int | None = None
    device_kv_bytes: int | None = None
    host_kv_bytes: int | None = None
    prefill_host_kv_bytes: int | None = None  # host RAM the prompt's exact prefill held, freed at its end
    placement: str | None = None  # where the KV heads were and how decode attended them (offloading caches)
    cuda_graph: bool = False  # decode steps were replayed from a CUDA graph

    @property
    def prefill_tokens_per_s(self) -> float:
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from the prefill logits; decode steps produce the rest
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        cached = f", {self.cached_tokens} cached" if self.cached_tokens else ""
        parts = [f"prefill {self.prompt_tokens} tok{cached} in {self.prefill_seconds:.2f} s "
                 f"({self.prefill_tokens_per_s:,.0f} tok/s)",
                 f"decode {self.new_tokens} tok at {self.decode_tokens_per_s:.1f} tok/s"
                 f"{' (CUDA graph)' if self.cuda_graph else ''}"]
        if self.peak_device_bytes is not None:
            parts.append(f"peak GPU {human_bytes(self.peak_device_bytes)}")
        if self.device_kv_bytes is not None:
            held = (f" (up to {human_bytes(self.prefill_host_kv_bytes)} while the prompt was prefilled)"
                    if self.prefill_host_kv_bytes else "")
            parts.append(f"KV {human_bytes(self.device_kv_bytes)} on device, "
                         f"{human_bytes(self.host_kv_bytes or 0)} in host RAM{held}")
        return " | ".join(parts)

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class Generation:
    text: str | None
    token_ids: list[int]
    stats: Stats = field(default_factory=Stats)


def placement_of(cache: Cache) -> str | None:
    """The cache's one-line placement (resident and offloaded heads, the decode split), if it has one."""
    return cache.describe() if isinstance(cache, HeadspaceCache) else None

