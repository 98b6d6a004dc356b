"""Shared fixtures: tiny random-weight models of every supported architecture, and the real SmolLM2.

Every comparison in this suite is ``offload`` against ``full`` (plain transformers:
SDPA and ``DynamicCache``), in float32 on the CPU. Tiny models use a large
``initializer_range`` so attention is peaked rather than nearly uniform: then a
single wrong key or a window off by one moves the logits by far more than the
1e-4 tolerance (``test_exactness.py`` checks that it does), so the comparisons
can fail.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    # Without a GPU, Triton kernels run in Triton's interpreter (numpy stands in for the GPU), so the tests run
    # the kernels' own code. It is chosen when @triton.jit decorates: before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter as _interpreter

    _patch_tensor = _interpreter._patch_lang_tensor

    def _scalars_as_numbers(tensor, scope):
        # the interpreter keeps a scalar as a one-element array, which numpy >= 2.4 no longer turns into an int
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _scalars_as_numbers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from headspace import Engine, Generation
from headspace.shape import ModelShape

# Maximum absolute difference allowed between offload and full logits (float32).
ATOL = 1e-4

VOCAB = 128
HIDDEN = 64
PROMPT_TOKENS = 80  # longer than every tiny sliding window below
NEW_TOKENS = 32

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    max_position_embeddings=256,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Tiny configs of the supported architectures: grouped-query attention everywhere
# (fewer KV heads than query heads, at least 2 KV heads), 2-3 layers, hidden size 64.
# Windows are much shorter than the prompt, so sliding-window semantics are exercised.
TINY_ARCHS: dict[str, dict] = {
    "llama": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4),
    "mistral": dict(model_type="mistral", num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                    head_dim=16, sliding_window=20),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # layer 0 full attention, layers 1-2 sliding: offloaded and on-device layers mixed
    "qwen2-sliding": dict(model_type="qwen2", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                          use_sliding_window=True, sliding_window=24, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                  head_dim=16),
    "phi3": dict(model_type="phi3", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4),
    "phi3-sliding": dict(model_type="phi3", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         sliding_window=17),
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, sliding_window=20,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    fields = {**_COMMON, **TINY_ARCHS[arch], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A float32 CPU model with weights drawn from ``seed`` (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_ids(length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


def kv_heads(config: PretrainedConfig) -> int:
    return config.get_text_config(decoder=True).num_key_value_heads


def full_layers(config: PretrainedConfig) -> int:
    return ModelShape.of(config).full_layers


@dataclass
class Run:
    """What one ``Engine.generate`` call produced, with the logits of its prefill."""

    logits: torch.Tensor  # last prompt token, (1, vocab), float32
    generation: Generation
    cache: object

    @property
    def tokens(self) -> list[int]:
        return self.generation.token_ids


def run_generate(engine: Engine, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> Run:
    """``engine.generate`` greedily (no EOS stop), recording the logits and cache its prefill returned."""
    seen: dict = {}
    prefill = engine.prefill

    def recording_prefill(*args, **kwargs):
        logits, cache = prefill(*args, **kwargs)
        seen["logits"], seen["cache"] = logits.clone(), cache
        return logits, cache

    engine.prefill = recording_prefill
    kept, engine.kept = engine.kept, None  # keep no prompt: the cache stays as the generation left it, not rolled back
    try:
        generation = engine.generate(ids, max_new_tokens=new_tokens, stop_on_eos=False)
    finally:
        del engine.prefill
        engine.kept = kept
    assert len(generation.token_ids) == new_tokens
    return Run(seen["logits"], generation, seen["cache"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_logits_equal(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert torch.isfinite(actual).all(), "offload logits are not finite"
    diff = max_diff(actual, expected)
    assert diff <= atol, f"max |offload - full| = {diff:.3g} > {atol}"


def assert_informative(logits: torch.Tensor, tokens: list[int] | None = None) -> None:
    """Reference outputs must be non-degenerate, or agreeing with them would prove nothing."""
    assert torch.isfinite(logits).all()
    assert logits.std().item() > 0.1, f"reference logits are nearly constant (std {logits.std().item():.3g})"
    if tokens is not None:
        assert len(set(tokens)) >= 3, f"reference greedy tokens are degenerate: {tokens}"


class TinyModels:
    """Builds each tiny model once per session; its ``full`` reference runs are cached too."""

    def __init__(self) -> None:
        self._models: dict[str, PreTrainedModel] = {}
        self._references: dict[tuple[str, int], Run] = {}

    def model(self, arch: str) -> PreTrainedModel:
        if arch not in self._models:
            self._models[arch] = build_model(tiny_config(arch), seed=sum(map(ord, arch)))
        return self._models[arch]

    def reference(self, arch: str, prompt_seed: int = 0) -> tuple[torch.Tensor, Run]:
        """Prompt ids and the ``full`` run over them, the whole prompt in one forward pass."""
        key = (arch, prompt_seed)
        ids = random_ids(PROMPT_TOKENS, seed=prompt_seed)
        if key not in self._references:
            engine = Engine(self.model(arch), mode="full", chunk_size=PROMPT_TOKENS)
            self._references[key] = run_generate(engine, ids)
        return ids, self._references[key]


@pytest.fixture
def one_thread(request):
    """Tiny models run on one thread: a second one only adds contention (10x slower on a busy machine).

    Tests marked ``slow`` (the real SmolLM2) keep every thread.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def cpu_default_device(monkeypatch):
    """The CLI's default device is the CPU, as on a machine without CUDA: command-line tests check CPU behaviour
    (host RAM checks, CPU placement lines) and must give the same answers on the GPU machine."""
    import headspace.bench
    import headspace.commands.common
    import headspace.models

    for module in (headspace.models, headspace.commands.common, headspace.bench):
        monkeypatch.setattr(module, "default_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return TinyModels()


TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Once upon a time there was a document, and many questions were asked about it. "
    "What is the pass key? The pass key is 68142. Remember it. Hello there, how are you? "
    "Café, naïve, 日本語, emoji and other characters of several bytes appear here too. "
)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A small byte-level BPE tokenizer (about 300 tokens) with a chat template, trained here in milliseconds:
    tests with tiny models need no packaged model (the GPU machine has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def assert_drawn(path, min_width: int = 200, min_height: int = 150) -> None:
    """``path`` is a PNG of at least that size with a drawing on it: varied pixels, not a blank canvas."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "the image is nearly uniform"
    assert (rgb.min(-1) < 0.9).mean() > 0.01, "almost nothing is drawn on the white canvas"


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged SmolLM2-135M, float32 on the CPU, loaded once per session."""
    from headspace import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    return model, tokenizer
