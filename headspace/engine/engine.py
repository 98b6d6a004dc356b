"""The engine: chunked prefill, then token-by-token decode, over a cache chosen by mode.

It owns the bookkeeping (encoding, length checks, the phase of each forward call,
timing) and leaves the tensors to the cache and the model: ``prefill`` feeds the
prompt ``chunk_size`` tokens at a time, computing only the last position's logits;
``decode_step`` feeds one token; ``generate`` does both and samples.

Documents: ``prefill_document`` prefills a prompt once and ``ask`` continues it with a
question, answers, and rolls the cache back (:mod:`headspace.documents.snapshot` says how
for each mode); ``save`` and ``load`` keep it on disk. ``generate`` itself keeps the
prompts it prefilled (within ``keep_bytes``) and prefills only what a new prompt adds to
the longest kept one it starts with.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

import headspace.attention.hook  # noqa: F401  (registers the "headspace" attention function)
from headspace.documents.document import Document
from headspace.documents.files import RUNTIME_OPTIONS, DocumentFile, model_fingerprint
from headspace.documents.files import save as save_document
from headspace.documents.store import DocumentStore
from headspace.engine.graphs import CaptureError, CompileError, GraphDecoder
from headspace.engine.modes import MODES, CacheRequest, options_json
from headspace.engine.sampling import SamplingParams, pick
from headspace.engine.stats import Generation, Stats, placement_of
from headspace.errors import HeadspaceError
from headspace.kv.cache import HeadspaceCache, OffloadOptions, kv_bytes
from headspace.kv.layers import Phase
from headspace.models import default_chunk_size
from headspace.placement import memory_shortfall
from headspace.shape import ModelShape
from headspace.units import parse_bytes

KEEP_AUTO = 0.5  # keep_bytes="auto": kept documents may hold up to this share of the host's RAM
QUESTION_MARK = "<|headspace-question|>"  # where a chat template puts the user's text (documents with chat=True)


class Engine:
    """Runs one model in one mode: ``prefill`` a prompt in chunks, ``generate`` text from it.

    ``options`` are the mode's (``gpu_heads=`` and ``gpu_memory=`` for ``offload``, ``compression=`` for
    the eviction modes, ...): they are checked here, once, and any the mode does not take is refused.

    ``keep_bytes`` bounds the prompts ``generate`` keeps for prefix reuse (device and host bytes
    of their caches; least recently used dropped first): a count, a size such as ``"20GiB"``,
    ``"auto"`` (the default: half of the host's RAM) or 0 to keep none. Whatever the bound, kept
    prompts are dropped before any new cache is allocated until it fits the free memory.

    ``cuda_graphs`` (:mod:`headspace.engine.graphs`): decode steps replayed from a CUDA graph.
    ``"auto"`` (the default) on CUDA whenever the cache holds every KV head on the GPU (an
    ``offload`` plan with nothing offloaded); ``True`` asks for it and refuses a cache it cannot
    serve (on a CPU it runs the same static decode step without a graph); ``False`` decodes eagerly.
    ``compile_layers``: those static steps run each decoder layer through ``torch.compile``
    (fewer, fused kernels per step; compiled on the first static step, a few seconds with
    torch's compile cache warm; :class:`~headspace.engine.graphs.CompiledLayers`). ``"auto"``
    (the default) where the steps are captured on CUDA, falling back to uncompiled steps with a
    warning if compiling fails; ``True`` also on a CPU, and a failure is an error; ``False`` never.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer=None,
        mode: str = "offload",
        chunk_size: int | None = None,
        allow_beyond_positions: bool = False,
        keep_bytes: int | str | None = "auto",
        cuda_graphs: bool | str = "auto",
        compile_layers: bool | str = "auto",
        **options,
    ):
        if mode not in MODES:
            raise HeadspaceError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
        self.model, self.tokenizer, self.mode = model, tokenizer, MODES[mode]
        self.shape = ModelShape.of(model.config)
        self.device, self.dtype = model.device, model.dtype
        self.chunk_size = chunk_size or default_chunk_size(self.device)
        if self.chunk_size < 1:
            raise HeadspaceError(f"chunk_size must be positive, got {self.chunk_size}")
        self.allow_beyond_positions = allow_beyond_positions
        self.options = self.mode.parse(options)
        self.kept = self._store(keep_bytes)
        if cuda_graphs not in (True, False, "auto"):
            raise HeadspaceError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
        if cuda_graphs is True and self.mode.name != "offload":
            raise HeadspaceError(f"cuda_graphs=True needs mode 'offload' with every KV head on the GPU; mode "
                                 f"'{self.mode.name}' decodes eagerly (pass cuda_graphs='auto' or False)")
        if compile_layers not in (True, False, "auto"):
            raise HeadspaceError(f"compile_layers must be True, False or 'auto', got {compile_layers!r}")
        self.cuda_graphs, self.compile_layers = cuda_graphs, compile_layers
        self._graphs: GraphDecoder | None = None
        self._capture_failed = False  # with "auto": this model's step could not be captured, decode eagerly

    def _store(self, keep_bytes: int | str | None) -> DocumentStore | None:
        if keep_bytes == "auto":
            budget = int(KEEP_AUTO * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        else:
            budget = parse_bytes(str(keep_bytes)) if keep_bytes not in (None, 0, "0") else 0
        return DocumentStore(budget, self.device) if budget and self.mode.documents else None

    @functools.cached_property
    def fingerprint(self) -> dict:
        """The model's architecture and a hash of a sample of its weights (documents record it)."""
        return model_fingerprint(self.model)

    @property
    def option_values(self) -> dict:
        """The mode's options as JSON values."""
        return options_json(self.options)

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | torch.Tensor, chat: bool = False,
               special_tokens: bool = True) -> torch.Tensor:
        """Token ids ``(1, n)`` on the model's device; text needs a tokenizer. ``special_tokens=False``: text that
        continues a document (a question) gets no start token."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise HeadspaceError("this model has no tokenizer: pass token ids instead of text")
            if not prompt.strip():
                raise HeadspaceError("the prompt is empty")
            if chat:
                ids = self.chat_ids([{"role": "user", "content": prompt}])
            else:
                ids = self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
            ids = torch.tensor([ids])
        else:
            ids = torch.as_tensor(prompt)
            if ids.dim() == 1:
                ids = ids[None]
        if ids.numel() == 0:
            raise HeadspaceError("the prompt is empty")
        return ids.to(self.device)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of chat ``messages`` (``{"role", "content"}`` dicts) in the model's chat template, ending
        where the assistant's answer begins. The template writes the special tokens, so none are added."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise HeadspaceError("this model has no chat template: send the prompt as plain text (not as chat)")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_length(self, tokens: int) -> None:
        self.shape.check_positions(tokens, self.allow_beyond_positions)

    # -- running --------------------------------------------------------------------------------
    def new_cache(self, tokens: int = 0, prompt_tokens: int | None = None) -> Cache:
        """A cache for this mode, with room reserved for ``tokens`` positions where the mode can use it.

        ``prompt_tokens`` is the length a compression ratio resolves against (eviction modes);
        :meth:`prefill` passes the prompt's.
        """
        return self._make_cache(self._request(tokens, prompt_tokens))

    def _make_cache(self, request: CacheRequest) -> Cache:
        """Drop kept prompts until ``request`` fits, then build its cache."""
        self._use_attention()
        self._make_room(request)
        cache = self.mode.make_cache(request)
        if self.cuda_graphs is True and not (isinstance(cache, HeadspaceCache) and cache.static_capable):
            raise HeadspaceError(f"cuda_graphs=True needs every KV head on the GPU, but this plan offloads some "
                                 f"({placement_of(cache)}); keep them resident (gpu_heads, a shorter context, "
                                 f"kv_dtype) or pass cuda_graphs='auto'")
        return cache

    def graph_decodes(self, cache: Cache) -> bool:
        """Whether decode steps of ``cache`` are replayed from a CUDA graph (or, on a CPU with
        ``cuda_graphs=True``, run in the same static form)."""
        if self.cuda_graphs is False or not isinstance(cache, HeadspaceCache) or not cache.static_capable:
            return False
        return self.cuda_graphs is True or (self.device.type == "cuda" and not self._capture_failed)

    def _request(self, tokens: int, prompt_tokens: int | None) -> CacheRequest:
        return CacheRequest(self.model, self.shape, self.options, tokens, prompt_tokens, self.chunk_size)

    def _make_room(self, request: CacheRequest, held: tuple[int, int] = (0, 0)) -> None:
        """Drop kept prompts until a cache for ``request`` fits, counting the ``held`` (device, host) bytes of the
        one it grows from."""
        if self.kept is not None and self.mode.footprint is not None:
            device, host = self.mode.footprint(request)
            self.kept.make_room(max(device - held[0], 0), max(host - held[1], 0))

    def _grow(self, cache: Cache, tokens: int) -> None:
        """Room for ``tokens`` positions in ``cache`` (kept prompts dropped first if that needs memory)."""
        self._make_room(self._request(tokens, tokens), held=kv_bytes(cache))
        if isinstance(cache, HeadspaceCache):
            cache.reserve(tokens)

    def _use_attention(self) -> None:
        if self.model.config._attn_implementation != self.mode.attention:
            self.model.set_attn_implementation(self.mode.attention)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: Cache, phase: Phase = Phase.PREFILL) -> torch.Tensor:
        """One forward call over ``ids`` with ``cache`` in ``phase``; the last position's logits ``(batch, vocab)``."""
        self._use_attention()
        if isinstance(cache, HeadspaceCache):
            cache.phase = phase
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def decode_step(self, token: int | torch.Tensor, cache: Cache) -> torch.Tensor:
        """Feed one new token; the logits of the next."""
        if self.graph_decodes(cache):
            self._use_attention()
            capture = self.device.type == "cuda"
            if self._graphs is None:
                compiled = self.compile_layers is True or (self.compile_layers == "auto" and capture)
                self._graphs = GraphDecoder(self.model, capture=capture, compile_layers=compiled)
            try:
                return self._graphs.step(token, cache)
            except CompileError as error:  # nothing was stored: the step runs again uncompiled
                if self.compile_layers is True:
                    raise HeadspaceError(f"{error}; pass compile_layers=False") from error
                warnings.warn(f"{error}; decoding without it", stacklevel=2)
                self.compile_layers, self._graphs = False, None
                return self.decode_step(token, cache)
            except CaptureError as error:
                if self.cuda_graphs is True:
                    raise HeadspaceError(f"{error}; decode eagerly with cuda_graphs=False") from error
                warnings.warn(f"{error}; decoding eagerly", stacklevel=2)
                self._capture_failed = True
        ids = token if isinstance(token, torch.Tensor) else torch.tensor([[token]], device=self.device)
        return self.forward(ids.reshape(1, 1).to(self.device), cache, Phase.DECODE)

    def prefill(
        self,
        ids: torch.Tensor | list[int],
        cache: Cache | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
        reserve: int = 0,
    ) -> tuple[torch.Tensor, Cache]:
        """Feed ``ids`` in chunks of ``chunk_size``; return the last token's logits and the cache.

        ``on_chunk(done, total)`` is called after every chunk (progress bars). ``cache``: one to continue
        (a new one by default). ``reserve``: positions the cache makes room for, those it holds included
        (at least the prompt's).
        """
        ids = self.encode(ids)
        total = ids.shape[1]
        room = max(total + (cache.get_seq_length() if cache is not None else 0), reserve)
        self.check_length(room)
        if cache is None:
            cache = self.new_cache(room, prompt_tokens=total)
        else:
            self._grow(cache, room)
        logits = None
        for start in range(0, total, self.chunk_size):
            logits = self.forward(ids[:, start : start + self.chunk_size], cache, Phase.PREFILL)
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
        to the final text. The prompt's prefix that a kept prompt covers is not prefilled again
        (``stats.cached_tokens``), and the prompt is kept in turn (see ``keep_bytes``).
        """
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, seed)
        ids = self.encode(prompt, chat=chat)
        room = ids.shape[1] + max_new_tokens
        self.check_length(room)
        stats = Stats(prompt_tokens=ids.shape[1])
        self._reset_peak()
        start = self._now()
        kept, stats.cached_tokens = self.kept.take(ids[0].cpu()) if self.kept is not None else (None, 0)
        if kept is None:
            logits, cache = self.prefill(ids, on_chunk=on_chunk, reserve=room)
        elif stats.cached_tokens == ids.shape[1]:  # the very prompt was kept, with its logits
            logits, cache = kept.logits, kept.cache
            self._grow(cache, room)
        else:
            if stats.cached_tokens < kept.length:
                kept.cut(stats.cached_tokens)
            logits, cache = self.prefill(ids[:, stats.cached_tokens :], cache=kept.cache, on_chunk=on_chunk,
                                         reserve=room)
        stats.prefill_seconds = self._now() - start
        document = self._document(ids, cache, logits) if self.kept is not None else None
        try:
            return self._answer(logits, cache, max_new_tokens, sampling, stop_on_eos, on_token, stats)
        finally:
            if document is not None:
                document.rollback()
                self.kept.put(document)

    # -- documents ------------------------------------------------------------------------------
    def prefill_document(
        self,
        prompt: str | list[int] | torch.Tensor,
        chat: bool = False,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Document:
        """Prefill a document once, to :meth:`ask` it questions or :meth:`save` it.

        With ``chat``, the document opens the user's turn of the chat template, and every
        question closes it: the template's end of turn and start of the answer follow it.
        """
        if not self.mode.documents:
            raise HeadspaceError(f"mode '{self.mode.name}' cannot keep documents: its cache cannot be rolled back")
        suffix: list[int] = []
        if chat:
            if not isinstance(prompt, str):
                raise HeadspaceError("chat=True takes the document as text")
            prompt, suffix = self._chat_halves(prompt)
        ids = self.encode(prompt, special_tokens=not chat)  # a chat template brings its own start token
        logits, cache = self.prefill(ids, on_chunk=on_chunk)
        return self._document(ids, cache, logits, suffix)

    def _chat_halves(self, text: str) -> tuple[str, list[int]]:
        """The chat template around ``text`` + a question, cut where the question goes: (text before, ids after)."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise HeadspaceError("chat=True needs a tokenizer with a chat template")
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text + QUESTION_MARK}],
                                                      tokenize=False, add_generation_prompt=True)
        if rendered.count(QUESTION_MARK) != 1:
            raise HeadspaceError("this chat template changes the user's text: prefill the document without chat=True")
        before, after = rendered.split(QUESTION_MARK)
        return before, self.tokenizer(after, add_special_tokens=False)["input_ids"]

    def ask(
        self,
        document: Document,
        question: str | list[int] | torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_on_eos: bool = True,
        on_token: Callable[[int, str], None] | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Answer ``question`` from a prefilled ``document``: only the question is prefilled, right after the
        document's tokens (text gets no start token; begin it with the space or newline it needs), and the
        document is rolled back afterwards, ready for the next question."""
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, seed)
        self._check_document(document)
        ids = self.encode(question, special_tokens=False)
        if document.suffix:
            ids = torch.cat([ids, torch.tensor([document.suffix], device=ids.device)], dim=1)
        room = document.length + ids.shape[1] + max_new_tokens
        self.check_length(room)
        stats = Stats(prompt_tokens=document.length + ids.shape[1], cached_tokens=document.length)
        self._reset_peak()
        start = self._now()
        try:
            logits, cache = self.prefill(ids, cache=document.cache, on_chunk=on_chunk, reserve=room)
            stats.prefill_seconds = self._now() - start
            return self._answer(logits, cache, max_new_tokens, sampling, stop_on_eos, on_token, stats)
        finally:
            document.rollback()

    def save(self, document: Document, path: str | os.PathLike, model_name: str | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> int:
        """Write ``document`` to ``path`` (``.hsc``) atomically; returns the bytes written. ``model_name`` (default:
        where the model was loaded from) lets ``headspace generate --load`` find the model again."""
        self._check_document(document)
        return save_document(document, path, model_name or self.model.name_or_path or None, on_progress)

    def load(self, path: str | os.PathLike, on_progress: Callable[[int, int], None] | None = None) -> Document:
        """A document saved by :meth:`save`, read back into a new cache with the file's split of heads between
        device and host, and kept for prefix reuse when this engine keeps prompts; refused, before anything is
        allocated, when it comes from another model, dtype or mode or does not fit the free memory."""
        file = DocumentFile.open(path)
        file.check_compatible(self.fingerprint, self.dtype, self.mode.name, self.option_values)
        length = file.length
        self.check_length(length)
        request = self._request(length, length)
        if isinstance(self.options, OffloadOptions):  # the file's split of heads between device and host
            request = dataclasses.replace(request, options=dataclasses.replace(
                self.options, gpu_heads=file.resident_heads(), gpu_memory=None))
        self._make_room(request)
        missing = memory_shortfall(*self.mode.footprint(request), self.device) if self.mode.footprint else None
        if missing:
            raise HeadspaceError(f"not enough memory to load '{file.path}': {missing}")
        with file.reading_ahead():  # the disk starts while the cache's host memory is allocated and pinned
            cache = self._make_cache(request)
        logits = file.read_into(cache, self.shape, self.device, self.dtype, on_progress)
        document = Document(torch.tensor(file.manifest["tokens"]), cache, logits, self.mode.name, self.option_values,
                            self.fingerprint, file.manifest["suffix"])
        if self.kept is not None:  # a prompt that starts with the document reuses it, as one generate kept
            self.kept.put(document)
        return document

    def _document(self, ids: torch.Tensor, cache: Cache, logits: torch.Tensor,
                  suffix: list[int] | None = None) -> Document:
        return Document(ids[0].cpu(), cache, logits, self.mode.name, self.option_values, self.fingerprint,
                        suffix or [])

    def _check_document(self, document: Document) -> None:
        def content(options: dict) -> dict:
            return {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}

        if (document.mode, content(document.options)) != (self.mode.name, content(self.option_values)):
            raise HeadspaceError(f"this document was prefilled in mode '{document.mode}' with {document.options}; "
                                 f"this engine runs '{self.mode.name}' with {self.option_values}")
        if document.model != self.fingerprint:
            raise HeadspaceError("this document was prefilled by another model")

    # -- decoding -------------------------------------------------------------------------------
    def _sampling(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  seed: int | None) -> SamplingParams:
        if max_new_tokens < 1:
            raise HeadspaceError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return SamplingParams(temperature, top_p, top_k, seed)

    def _answer(self, logits: torch.Tensor, cache: Cache, max_new_tokens: int, sampling: SamplingParams,
                stop_on_eos: bool, on_token: Callable[[int, str], None] | None, stats: Stats) -> Generation:
        """Decode from the prompt's ``logits`` and finish ``stats``."""
        start = self._now()
        tokens = self.decode(logits, cache, max_new_tokens, sampling, stop_on_eos, on_token)
        stats.decode_seconds = self._now() - start
        stats.new_tokens = len(tokens)
        stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        stats.device_kv_bytes, stats.host_kv_bytes = kv_bytes(cache)
        if isinstance(cache, HeadspaceCache) and not stats.cached_tokens:  # a kept prompt's prefill is not this run's
            stats.prefill_host_kv_bytes = cache.released_host_kv_bytes
        stats.placement = placement_of(cache)
        stats.cuda_graph = self.graph_decodes(cache) and self.device.type == "cuda"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else None
        return Generation(text, tokens, stats)

    def decode(self, logits: torch.Tensor, cache: Cache, max_new_tokens: int, sampling: SamplingParams,
               stop_on_eos: bool = True, on_token: Callable[[int, str], bool | None] | None = None) -> list[int]:
        """Sample from ``logits``, feed the token back, repeat: up to ``max_new_tokens`` tokens (or an end token).

        When ``on_token`` returns True, decoding stops after that token, which is the last one returned: the
        caller found what it waited for (a stop string) or nobody waits any more (a server's client left), and
        no further forward call is spent.
        """
        generator = sampling.generator()
        eos = self.eos_ids() if stop_on_eos else set()
        tokens: list[int] = []
        text_so_far = ""
        while True:
            token = pick(logits, sampling, generator)
            tokens.append(token)
            done = token in eos or len(tokens) >= max_new_tokens
            if on_token is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
                # a multi-byte character split across tokens decodes as U+FFFD until complete: hold it back
                if done or not text.endswith("\ufffd"):
                    done |= bool(on_token(token, text[len(text_so_far):]))
                    text_so_far = text
                else:
                    done |= bool(on_token(token, ""))
            if done:
                return tokens
            logits = self.decode_step(token, cache)

    # -- helpers --------------------------------------------------------------------------------
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
