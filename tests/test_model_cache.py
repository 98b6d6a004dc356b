"""The dequantized copy of a GGUF under the cache: made once, even by processes that start together."""

from __future__ import annotations

import copy

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
