"""Saving a kept document to one file and loading it back (``.hsc``).

The file is a safetensors file (``safetensors.safe_open`` reads it): an 8-byte header
length, a JSON header naming every tensor's dtype, shape and byte range, then the bytes.
The header's metadata holds the manifest: format version, headspace version, the model's
fingerprint (architecture and a hash of a strided sample of every weight: hashing all
of them would take longer than the load), dtype, mode and options, the document's token
ids, each layer's kind and length, and a CRC32 of every 32 MiB of every tensor.

Tensors: ``logits`` (what follows the document), ``policy.state`` (eviction policies
with a state), and per layer ``layers.<i>.<part>`` - ``keys``/``values`` of device stores
and windows, ``resident.*`` and ``host.*`` of offloaded layers, ``positions``/``scores``, ``summaries.*`` and
``host.positions`` of budgeted ones. Host tiers are written from, and read straight into,
their (pinned) blocks, one (batch, head) row at a time: no second copy of the cache is
made in RAM. Reads go straight into those blocks rather than through a memory map: the
same single copy, in large sequential reads instead of page faults; while the cache is
being allocated, a thread already reads the file ahead into the page cache. Checksums are
computed by a thread pool while the main thread reads or writes.

A save is atomic: the file is written under a temporary name in the same directory,
flushed and fsynced, renamed over the target, and the directory fsynced. A save killed
half-way leaves the old file (or none) and a temporary file that does not load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from headspace.documents.document import Document
from headspace.documents.snapshot import policies
from headspace.errors import HeadspaceError
from headspace.eviction.budget import BudgetLayer
from headspace.kv.layers import OffloadLayer, WindowLayer
from headspace.kv.quant.store import QuantizedKV
from headspace.kv.tiers import HostKV
from headspace.shape import ModelShape

FORMAT = 1  # the newest file format this code reads and the one it writes
KIND = "headspace-document"
BLOCK = 32 << 20  # bytes per checksum and per read or write call
IOV_MAX = 1024  # buffers one readv or writev takes (Linux)
ALIGN = 4096  # the tensors' bytes start on a page boundary
MAX_HEADER = 100 << 20  # as safetensors
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
# change where KV lives, speed or decode, not what the cache holds (a load keeps the file's split of heads)
RUNTIME_OPTIONS = {"gpu_heads", "gpu_memory", "group_heads", "cpu_heads", "decode"}
# options that files saved before they existed were saved with: a loading engine compares with these
OPTION_DEFAULTS = {"kv_dtype": "bf16", "once": False, "merge": 0, "release": False, "prefill": "chunked"}
SUMMARY_PARTS = ("keys", "values", "counts")  # a budgeted layer's merged evicted tokens (``merge``)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all); first called with 0 as the bytes start to move


def headspace_version() -> str:
    try:
        return importlib.metadata.version("headspace")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- the model's fingerprint ------------------------------------------------------------------------------------

def model_fingerprint(model: PreTrainedModel, samples: int = 4096) -> dict:
    """The architecture (what the cache's layout depends on) and a hash of ``samples`` evenly strided values of
    every parameter: a different checkpoint differs there, and it costs milliseconds, not a read of every weight."""
    text = model.config.get_text_config(decoder=True)
    architecture = {**dataclasses.asdict(ModelShape.of(model.config)),
                    "intermediate_size": getattr(text, "intermediate_size", None),
                    "rope": getattr(text, "rope_parameters", None)}
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            flat = parameter.detach().reshape(-1)
            count = min(samples, flat.numel())
            index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            digest.update(f"{name}:{tuple(parameter.shape)}".encode())
            digest.update(flat[index].float().cpu().numpy().tobytes())
    return json.loads(json.dumps({"architecture": architecture, "weights": digest.hexdigest()[:32]}, default=str))


# -- tensors as pieces of bytes ---------------------------------------------------------------------------------

@dataclass
class Entry:
    """One tensor of a file: its name, dtype and shape, and its bytes as contiguous CPU tensors in the order of
    its memory. Saving reads the pieces; loading fills them, then calls ``done``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]
    done: Callable[[], None] = lambda: None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _blocks(view: memoryview) -> Iterable[memoryview]:
    for start in range(0, len(view), BLOCK):
        yield view[start : start + BLOCK]


def _move_all(call: Callable[[int, list[memoryview]], int], fd: int, views: list[memoryview]) -> None:
    """``os.readv`` or ``os.writev`` every byte of ``views``, going on after a partial call; EOFError at the end of
    the file."""
    views, first = [view for view in views if len(view)], 0
    while first < len(views):
        count = call(fd, views[first:])
        if count == 0:
            raise EOFError
        while first < len(views) and count >= len(views[first]):
            count -= len(views[first])
            first += 1
        if first < len(views):
            views[first] = views[first][count:]


def _write_all(fd: int, views: list[memoryview]) -> None:
    _move_all(os.writev, fd, views)


def _read_all(fd: int, views: list[memoryview]) -> None:
    _move_all(os.readv, fd, views)


def _transfer(fd: int, entries: list[Entry], move: Callable[[int, list[memoryview]], None],
              on_progress: Progress | None) -> dict[str, list[str]]:
    """Move every entry's bytes between its pieces and ``fd``, in order, with ``move(fd, views)``: one call per
    ``BLOCK`` bytes (pieces smaller than that are gathered into one ``writev``/``readv``: the disk sees the same
    large requests as when its own rates are measured). Each entry is checksummed on a thread pool meanwhile and
    its ``done`` called once its bytes are moved. Returns the checksums."""
    total, moved = sum(entry.nbytes for entry in entries), 0
    if on_progress is not None:
        on_progress(0, total)
    batch: list[tuple[Entry, memoryview]] = []
    finished: list[Entry] = []
    batched = 0
    with _pool() as pool:
        sums = {entry.name: Checksums(pool) for entry in entries}

        def flush() -> None:
            nonlocal moved, batched
            move(fd, [view for _, view in batch])
            for entry, view in batch:
                sums[entry.name].add(view)
            for entry in finished:
                entry.done()
            moved, batched = moved + batched, 0
            batch.clear()
            finished.clear()
            if on_progress is not None:
                on_progress(moved, total)

        for entry in entries:
            for piece in entry.pieces():
                for view in _blocks(_view(piece)):
                    batch.append((entry, view))
                    batched += len(view)
                    if batched >= BLOCK or len(batch) == IOV_MAX:
                        flush()
            finished.append(entry)
        flush()
        return {name: checksums.result() for name, checksums in sums.items()}


def _crc(parts: list[memoryview]) -> int:
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)  # releases the GIL: the pool's threads run in parallel
    return value


class Checksums:
    """CRC32 of every ``BLOCK`` bytes of one tensor, computed on ``pool`` while its bytes are written or read."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.parts: list[memoryview] = []
        self.filled = 0
        self.blocks: list[Future] = []

    def add(self, data: memoryview) -> None:
        while data:
            take = min(len(data), BLOCK - self.filled)
            self.parts.append(data[:take])
            self.filled += take
            data = data[take:]
            if self.filled == BLOCK:
                self._submit()

    def _submit(self) -> None:
        self.blocks.append(self.pool.submit(_crc, self.parts))
        self.parts, self.filled = [], 0

    def result(self) -> list[str]:
        if self.parts:
            self._submit()
        return [f"{block.result():08x}" for block in self.blocks]


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="headspace-crc")


# -- what a cache holds, as entries -----------------------------------------------------------------------------

def _whole(name: str, tensor: torch.Tensor) -> Entry:
    """A tensor saved whole (device stores, windows, positions): copied to the CPU when written."""
    return Entry(name, tensor.dtype, tuple(tensor.shape), lambda: [tensor.contiguous().cpu()])


def _rows(name: str, host: HostKV, values: bool) -> Entry:
    batch, heads, dim = host.shape
    return Entry(name, host.dtype, (batch, heads, host.length, dim), lambda: host.rows(host.length, values))


# the first matching class names a layer's kind: subclasses before their bases
LAYER_KINDS = [(DynamicSlidingWindowLayer, "dynamic-window"), (DynamicLayer, "dynamic"), (WindowLayer, "window"),
               (OffloadLayer, "offload"), (BudgetLayer, "budget")]


def layer_kind(layer) -> str:
    for layer_type, kind in LAYER_KINDS:
        if isinstance(layer, layer_type):
            return kind
    raise HeadspaceError(f"a cache layer of type {type(layer).__name__} cannot be saved")


def _pair(prefix: str, keys: torch.Tensor, values: torch.Tensor) -> list[Entry]:
    return [_whole(prefix + "keys", keys), _whole(prefix + "values", values)]


def _layer_entries(prefix: str, layer) -> tuple[dict, list[Entry]]:
    """The manifest record of one layer and its tensors, for saving."""
    kind = layer_kind(layer)
    if kind == "dynamic-window":
        return {"kind": kind, "length": layer.cumulative_length}, _pair(prefix, layer.keys, layer.values)
    if kind == "dynamic":
        return {"kind": kind, "length": layer.get_seq_length()}, _pair(prefix, layer.keys, layer.values)
    if kind == "window":
        return {"kind": kind, "length": layer.length}, _pair(prefix, *layer.store.view())
    if kind == "offload":
        entries = []
        if layer.resident is not None:
            resident = layer.resident
            entries += _pair(prefix + "resident.", *(resident.rows if isinstance(resident, QuantizedKV)
                                                       else resident).view())
        if layer.host is not None:
            host = layer.host.rows if isinstance(layer.host, QuantizedKV) else layer.host
            entries += [_rows(prefix + "host.keys", host, False), _rows(prefix + "host.values", host, True)]
        for tier, store in (("resident", layer.resident), ("host", layer.host)):
            if isinstance(store, QuantizedKV):  # its rows are above; its newest positions in full precision
                entries += _pair(f"{prefix}{tier}.recent.", *store.recent)
        return {"kind": kind, "length": layer.length}, entries
    entries = _pair(prefix, *layer.store.view())
    entries += [_whole(prefix + "positions", layer.positions), _whole(prefix + "scores", layer.scores)]
    host = layer.host.length if layer.host is not None else 0
    if host:
        rows = layer.host.rows if isinstance(layer.host, QuantizedKV) else layer.host
        entries += [_rows(prefix + "host.keys", rows, False), _rows(prefix + "host.values", rows, True),
                    _whole(prefix + "host.positions", torch.cat(layer.host_positions, dim=-1))]
        if isinstance(layer.host, QuantizedKV):
            entries += _pair(prefix + "host.recent.", *layer.host.recent)
    if layer.summaries is not None:
        entries += [_whole(prefix + f"summaries.{part}", getattr(layer.summaries, part)) for part in SUMMARY_PARTS]
    return {"kind": kind, "length": layer.length, "budget": layer.settings.budget, "host": host}, entries


def _state_entries(cache: Cache) -> list[Entry]:
    states = [policy.state() for policy in policies(cache)]
    return [_whole(f"policy.{i}.state", state) for i, state in enumerate(states) if state is not None]


# -- the file ---------------------------------------------------------------------------------------------------

def _header(manifest: dict, entries: list[Entry], checksums: dict[str, list[str]]) -> bytes:
    """The safetensors header; checksums are fixed-width, so it is as long before they are known as after."""
    text = json.dumps({**manifest, "block_bytes": BLOCK, "checksums": checksums}, separators=(",", ":"))
    crc = f"{zlib.crc32(text.encode()):08x}"
    header: dict = {"__metadata__": {"format": KIND, "manifest": text, "manifest_crc32": crc}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-(8 + len(raw)) % ALIGN)


def _kv_dtype(layer) -> torch.dtype:
    """The dtype a layer's KV was computed in: headspace's layers record it; transformers' own (``full``) carry it
    only on their tensors (``DynamicLayer.dtype`` went away in transformers 5.24)."""
    return layer.dtype if hasattr(layer, "dtype") else layer.keys.dtype


def save(document: Document, path: str | os.PathLike, model_name: str | None = None,
         on_progress: Progress | None = None) -> int:
    """Write ``document`` to ``path`` atomically; returns the file's size in bytes.

    ``model_name`` (what the model was loaded as) is recorded so that the command line can load it again.
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise HeadspaceError(f"cannot save '{path}': directory '{path.parent}' does not exist")
    if path.is_dir():
        raise HeadspaceError(f"cannot save '{path}': it is a directory")
    layers, entries = [], [_whole("logits", document.logits)] + _state_entries(document.cache)
    for index, layer in enumerate(document.cache.layers):
        record, tensors = _layer_entries(f"layers.{index}.", layer)
        layers.append(record)
        entries += tensors
    manifest = {"format": FORMAT, "headspace": headspace_version(), "model": document.model, "model_name": model_name,
                "dtype": str(_kv_dtype(document.cache.layers[0])).removeprefix("torch."),
                "mode": document.mode, "options": document.options, "tokens": document.tokens.tolist(),
                "suffix": list(document.suffix), "layers": layers}
    header = _header(manifest, entries, {entry.name: ["0" * 8] * -(-entry.nbytes // BLOCK) for entry in entries})

    def write(fd: int) -> None:
        _write_all(fd, [memoryview(struct.pack("<Q", len(header)) + header)])
        checksums = _transfer(fd, entries, _write_all, on_progress)
        final = _header(manifest, entries, checksums)  # as long as the first: the checksums are fixed-width
        os.pwrite(fd, final, 8)

    _write_atomically(path, write)
    return 8 + len(header) + sum(entry.nbytes for entry in entries)


def _write_atomically(path: Path, write: Callable[[int], None]) -> None:
    """``write(fd)`` a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync the directory:
    whenever it stops, ``path`` is the old file (or none) or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise HeadspaceError(f"cannot save '{path}': {error.strerror or error}") from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


@dataclass
class DocumentFile:
    """A document file's header, checked: it is whole, of a format this code reads, and its manifest is intact."""

    path: Path
    manifest: dict
    tensors: dict[str, dict]  # name -> dtype, shape, data_offsets
    data_start: int

    @property
    def nbytes(self) -> int:
        return self.data_start + max((spec["data_offsets"][1] for spec in self.tensors.values()), default=0)

    @property
    def length(self) -> int:
        return len(self.manifest["tokens"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> DocumentFile:
        path = Path(path).expanduser()
        name = f"'{path}'"
        if not path.is_file():
            raise HeadspaceError(f"document file {name} does not exist" if not path.exists()
                                 else f"{name} is not a file")
        size = path.stat().st_size
        with open(path, "rb") as file:
            first = file.read(8)
            length = struct.unpack("<Q", first)[0] if len(first) == 8 else None
            if length is None or length > min(MAX_HEADER, size - 8):
                raise HeadspaceError(f"{name} is not a headspace document, or it is truncated (no whole header)")
            raw = file.read(length)
        try:
            header = json.loads(raw)
            metadata = header.pop("__metadata__")
        except (ValueError, KeyError, AttributeError):
            raise HeadspaceError(f"{name} is not a headspace document, or its header is corrupted") from None
        if not isinstance(metadata, dict) or metadata.get("format") != KIND:
            raise HeadspaceError(f"{name} is not a headspace document (a safetensors file without its manifest)")
        text = metadata.get("manifest", "")
        if f"{zlib.crc32(text.encode()):08x}" != metadata.get("manifest_crc32"):
            raise HeadspaceError(f"{name} is corrupted: its manifest fails its checksum")
        manifest = json.loads(text)
        if manifest.get("format", math.inf) > FORMAT:
            raise HeadspaceError(f"{name} was written by a newer headspace ({manifest.get('headspace')}, file format "
                                 f"{manifest.get('format')}); this one ({headspace_version()}) reads format {FORMAT}: "
                                 f"upgrade headspace")
        found = cls(path, manifest, header, 8 + length)
        ranges = sorted(spec["data_offsets"] for spec in header.values())
        if any(a[1] != b[0] for a, b in zip([[0, 0], *ranges], ranges)):
            raise HeadspaceError(f"{name} is corrupted: its tensors' byte ranges leave gaps or overlap")
        if size < found.nbytes:
            raise HeadspaceError(f"{name} is truncated: it holds {size:,} of its {found.nbytes:,} bytes "
                                 f"(an interrupted copy?)")
        if size > found.nbytes:
            raise HeadspaceError(f"{name} is corrupted: {size - found.nbytes:,} bytes more than its header describes")
        return found

    def check_compatible(self, model: dict, dtype: torch.dtype, mode: str, options: dict) -> None:
        """Refuse, in one line, a file from another model, dtype or mode than the loading engine's."""
        manifest, name = self.manifest, f"'{self.path}'"
        saved_dtype = manifest["dtype"].removeprefix("torch.")
        if saved_dtype != str(dtype).removeprefix("torch."):
            raise HeadspaceError(f"{name} holds a {saved_dtype} cache but the model runs in "
                                 f"{str(dtype).removeprefix('torch.')}: load the model in {saved_dtype} "
                                 f"(--dtype {saved_dtype})")
        source = f" ({manifest['model_name']})" if manifest.get("model_name") else ""
        if manifest["model"]["architecture"] != model["architecture"]:
            differ = sorted(key for key in model["architecture"]
                            if manifest["model"]["architecture"].get(key) != model["architecture"][key])
            raise HeadspaceError(f"{name} was saved from another model{source}: its {', '.join(differ)} differ "
                                 f"from this model's")
        if manifest["model"]["weights"] != model["weights"]:
            raise HeadspaceError(f"{name} was saved from another model{source}: same architecture, other weights")
        if manifest["mode"] != mode:
            raise HeadspaceError(f"{name} was saved in mode '{manifest['mode']}' and this engine runs '{mode}': "
                                 f"use mode '{manifest['mode']}' (--mode {manifest['mode']})")
        saved = {**OPTION_DEFAULTS, **manifest["options"]}
        differ = [key for key in sorted((set(options) | set(manifest["options"])) - RUNTIME_OPTIONS)
                  if saved.get(key) != options.get(key)]
        if differ:
            raise HeadspaceError(f"{name} was saved with {', '.join(f'{key}={saved.get(key)}' for key in differ)} "
                                 f"and this engine has {', '.join(f'{key}={options.get(key)}' for key in differ)}: "
                                 f"make the engine with the file's options")

    def resident_heads(self) -> tuple[int, ...]:
        """Per offloaded layer, the KV heads the saving cache kept on the device: a load builds its cache with
        the same split, whatever plan the loading machine would make, so each tensor reads back whole."""
        return tuple(self.tensors[f"layers.{index}.resident.keys"]["shape"][1]
                     if f"layers.{index}.resident.keys" in self.tensors else 0
                     for index, record in enumerate(self.manifest["layers"]) if record["kind"] == "offload")

    @contextlib.contextmanager
    def reading_ahead(self) -> Iterator[None]:
        """Read the file into the page cache on a thread for as long as the block runs: wrapped around allocating
        the cache (pinning host memory takes seconds), the disk is busy from the start instead of after it."""
        stop = threading.Event()

        def read() -> None:
            scratch = memoryview(bytearray(BLOCK))
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while not stop.is_set() and os.readv(fd, [scratch]):
                    pass
            finally:
                os.close(fd)

        thread = threading.Thread(target=read, name="headspace-read-ahead", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    @torch.inference_mode()  # as a prefill would make them: inference tensors
    def read_into(self, cache: Cache, shape: ModelShape, device: torch.device, dtype: torch.dtype,
                  on_progress: Progress | None = None) -> torch.Tensor:
        """Fill ``cache`` (new, with room for the document) from the file, checking every checksum; returns the
        logits of the token after the document."""
        if len(self.manifest["layers"]) != len(cache.layers):
            raise self._layout(f"{len(self.manifest['layers'])} layers, this model's cache has {len(cache.layers)}")
        found: dict[str, torch.Tensor] = {}
        entries = [self._whole("logits", device, lambda logits: found.__setitem__("logits", logits))]
        for i, policy in enumerate(policies(cache)):
            if f"policy.{i}.state" in self.tensors:
                entries.append(self._whole(f"policy.{i}.state", torch.device("cpu"), policy.set_state))
        empty = torch.empty(1, shape.kv_heads, 0, shape.head_dim, dtype=dtype, device=device)
        for index, (layer, record) in enumerate(zip(cache.layers, self.manifest["layers"])):
            prefix = f"layers.{index}."
            if record["kind"] != layer_kind(layer):
                raise self._layout(f"layer {index} is a '{record['kind']}' layer in the file and a "
                                   f"'{layer_kind(layer)}' one here")
            layer.update(empty, empty)  # the layer initializes itself as on its first chunk
            entries += self._layer_targets(prefix, layer, record, device, dtype)
        unplaced = sorted(set(self.tensors) - {entry.name for entry in entries})
        if unplaced:
            raise self._layout(f"it holds {', '.join(unplaced[:3])} that this engine's cache has no place for")
        self._read(entries, on_progress)
        return found["logits"]

    # -- loading helpers ---------------------------------------------------------------------------------------
    def _layout(self, what: str) -> HeadspaceError:
        return HeadspaceError(f"'{self.path}' does not fit this engine's cache: {what}")

    def _spec(self, name: str, dtype: torch.dtype | None, shape: tuple | None) -> dict:
        spec = self.tensors.get(name)
        if spec is None:
            raise self._layout(f"it has no tensor {name}")
        if dtype is not None and spec["dtype"] != DTYPES[dtype] or shape is not None and tuple(spec["shape"]) != shape:
            raise self._layout(f"{name} is {spec['dtype']} {tuple(spec['shape'])} in the file, "
                               f"{DTYPES.get(dtype)} {shape} here")
        return spec

    def _whole(self, name: str, device: torch.device, install: Callable[[torch.Tensor], None],
               dtype: torch.dtype | None = None, shape: tuple | None = None) -> Entry:
        """A tensor read into a CPU buffer, then handed, on ``device``, to ``install``."""
        spec = self._spec(name, dtype, shape)
        kind = next(t for t, code in DTYPES.items() if code == spec["dtype"])
        buffer = torch.empty(spec["shape"], dtype=kind)
        return Entry(name, kind, tuple(spec["shape"]), lambda: [buffer], lambda: install(buffer.to(device)))

    def _pair(self, prefix: str, device: torch.device, dtype: torch.dtype,
              install: Callable[[torch.Tensor, torch.Tensor], None], shape: tuple | None = None) -> list[Entry]:
        """Keys and values read whole; ``install(keys, values)`` once both are in (values follow keys in a file)."""
        keys: list[torch.Tensor] = []
        return [self._whole(prefix + "keys", device, keys.append, dtype, shape),
                self._whole(prefix + "values", device, lambda values: install(keys.pop(), values), dtype, shape)]

    def _host(self, prefix: str, host: HostKV, tokens: int) -> list[Entry]:
        """Keys and values read straight into the rows of ``host`` (room for ``tokens`` made, length set)."""
        batch, heads, dim = host.shape
        host.set_length(tokens)
        entries = []
        for part, values in (("keys", False), ("values", True)):
            self._spec(prefix + part, host.dtype, (batch, heads, tokens, dim))
            entries.append(Entry(prefix + part, host.dtype, (batch, heads, tokens, dim),
                                 functools.partial(host.rows, tokens, values)))
        return entries

    def _layer_targets(self, prefix: str, layer, record: dict, device: torch.device,
                       dtype: torch.dtype) -> list[Entry]:
        """Where each of one (initialized, empty) layer's tensors goes."""
        kind, length = record["kind"], record["length"]
        if kind in ("dynamic", "dynamic-window"):
            def install_dynamic(keys: torch.Tensor, values: torch.Tensor) -> None:
                layer.keys, layer.values = keys, values
                if kind == "dynamic-window":
                    layer.cumulative_length = length
            return self._pair(prefix, device, dtype, install_dynamic)
        layer.length = length
        if kind == "window":
            return self._pair(prefix, device, dtype, layer.store.append)
        if kind == "offload":
            return self._offload_targets(prefix, layer, length, device, dtype)
        if record["budget"] != layer.settings.budget:
            raise self._layout(f"its budget is {record['budget']} tokens per head, this engine's "
                               f"{layer.settings.budget}")
        entries = self._pair(prefix, device, layer.store.dtype, layer.store.append)  # rows, if quantized
        entries += [self._whole(prefix + "positions", device, lambda t: setattr(layer, "positions", t)),
                    self._whole(prefix + "scores", device, lambda t: setattr(layer, "scores", t))]
        if layer.summaries is not None:  # the engine's options match the file's (merge included)
            entries += [self._whole(prefix + f"summaries.{part}", device,
                                    lambda t, part=part: setattr(layer.summaries, part, t))
                        for part in SUMMARY_PARTS]
        if record["host"]:
            if layer.host is None:
                raise self._layout("it holds evicted tokens in host memory and this mode keeps none")
            host, count = layer.host, record["host"]
            if isinstance(host, QuantizedKV):  # its rows, then its newest evicted tokens in full precision
                rows = self._spec(prefix + "host.keys", None, None)["shape"][2]
                batch, heads, dim = host.shape
                entries += self._pair(prefix + "host.recent.", device, dtype,
                                      lambda k, v, store=host: setattr(store, "recent", (k, v)),
                                      (batch, heads, count - rows, dim))
                host, count = host.rows, rows
            host.reserve(count, at_least=host.block_tokens)
            entries += self._host(prefix + "host.", host, count)
            entries.append(self._whole(prefix + "host.positions", torch.device("cpu"), layer.host_positions.append))
        return entries

    def _offload_targets(self, prefix: str, layer: OffloadLayer, length: int, device: torch.device,
                         dtype: torch.dtype) -> list[Entry]:
        """Where an offload layer's tensors go: exact tiers take ``length`` positions; a quantized tier takes
        the rows in the file, then its newest positions in full precision."""
        layer.pending = None
        entries = []
        for tier, store in (("resident", layer.resident), ("host", layer.host)):
            if store is None:
                continue
            quantized = isinstance(store, QuantizedKV)
            target = store.rows if quantized else store
            rows = self._spec(f"{prefix}{tier}.keys", None, None)["shape"][2] if quantized else length
            if tier == "resident":
                batch, heads, dim = target.shape
                entries += self._pair(prefix + "resident.", device, target.dtype, target.append,
                                      (batch, heads, rows, dim))
            else:
                target.reserve(rows)
                entries += self._host(prefix + "host.", target, rows)
            if quantized:
                batch, heads, dim = store.shape
                install = functools.partial(setattr, store, "recent")
                entries += self._pair(f"{prefix}{tier}.recent.", device, dtype, lambda k, v, put=install: put((k, v)),
                                      (batch, heads, length - rows, dim))
        return entries

    def _read(self, entries: list[Entry], on_progress: Progress | None) -> None:
        """Read every entry's bytes, in file order, and check them against the manifest's checksums."""
        entries = sorted(entries, key=lambda entry: self.tensors[entry.name]["data_offsets"][0])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.lseek(fd, self.data_start, os.SEEK_SET)  # the tensors' bytes follow one another (checked in open)
            checksums = _transfer(fd, entries, _read_all, on_progress)
        except EOFError:
            raise HeadspaceError(f"'{self.path}' is truncated: it ended while it was read") from None
        finally:
            os.close(fd)
        for entry in entries:
            if checksums[entry.name] != self.manifest["checksums"].get(entry.name):
                raise HeadspaceError(f"'{self.path}' is corrupted: {entry.name} fails its checksum; "
                                     f"save the document again")
