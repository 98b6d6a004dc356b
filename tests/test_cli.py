"""The command line: exit codes and one-line errors for bad input, `info` numbers, and `generate` end to end.

Most tests call :func:`headspace.commands.main` in-process on a tiny random Llama
with a small byte-level tokenizer made here (2 layers, 2 KV heads, 64 positions),
so they take seconds and need no packaged model; tests marked ``slow`` run the real
packaged SmolLM2.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import headspace.commands.eval
import headspace.commands.generate
import headspace.engine.engine
from headspace import commands as cli
from headspace.commands.common import context_size
from headspace.engine.engine import Engine
from headspace.models import PRESETS
from headspace.shape import SUPPORTED_TYPES

pytestmark = pytest.mark.usefixtures("cpu_default_device")  # CPU behaviour, also on a GPU machine

TINY_KV_HEADS = 2
TINY_POSITIONS = 64
# the least each command needs besides --model
REQUIRED = {"generate": ["--prompt", "hi"], "info": ["--context", "4k"]}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, byte_tokenizer):
    """A Hugging Face directory: random 2-layer Llama with a small byte-level tokenizer and 64 positions."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=TINY_KV_HEADS, vocab_size=len(tokenizer),
                         max_position_embeddings=TINY_POSITIONS, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if weights get loaded: the error must come from the up-front checks."""
    def boom(*args, **kwargs):
        raise AssertionError("load_model was called, but the input should have been refused before")

    for command in (headspace.commands.generate, headspace.commands.eval):
        monkeypatch.setattr(command, "load_model", boom)


@pytest.fixture
def little_ram(monkeypatch):
    """Pretend the host has no RAM available."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=0))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line in ``err``; fails when there is none, several, or a traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("headspace: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def refused(capsys, *argv: str) -> str:
    """Run ``argv``, expect exit 2 and exactly one error line; return it."""
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    return error_line(err)


def unsupported_dir(tmp_path, model_type: str) -> str:
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(path)


# -- parsing --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "tokens"), [("4096", 4096), ("32k", 32768), ("32K", 32768), ("1m", 2**20),
                                              ("1M", 2**20), ("0.5k", 512), ("128_000", 128000)])
def test_context_sizes(text, tokens):
    assert context_size(text) == tokens


@pytest.mark.parametrize("text", ["abc", "0", "-5", "1.5", "1g", "", "k"])
def test_bad_context_sizes_are_refused(capsys, text):
    line = refused(capsys, "info", "--model", "random:llama-3.2-1b", "--context", text)
    assert "--context" in line and "token count" in line


def test_no_command(capsys):
    assert "required" in refused(capsys)


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in cli.COMMANDS:
        assert command.__name__.rsplit(".", 1)[-1].replace("_", "-") in out


def test_unknown_mode_and_conflicting_prompts(capsys, no_loading):
    assert "--mode" in refused(capsys, "generate", "--mode", "nope")
    assert "not allowed" in refused(capsys, "generate", "--prompt", "a", "--prompt-file", "b")
    assert "--top-p" in refused(capsys, "generate", "--top-p", "0")
    assert "--max-new-tokens" in refused(capsys, "generate", "--max-new-tokens", "0")


# -- bad input: refused with one line and exit 2, before any weights load --------------------------

@pytest.mark.parametrize("command", ["generate", "info"])
def test_missing_model_path(capsys, tmp_path, no_loading, command):
    line = refused(capsys, command, "--model", str(tmp_path / "nowhere"), *REQUIRED[command])
    assert "does not exist" in line and "nowhere" in line


def test_directory_without_a_tokenizer_is_refused_in_one_line(capsys, tmp_path):
    """A model directory with config and weights but no tokenizer files: one line, exit 2, no traceback."""
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1)).save_pretrained(tmp_path)
    line = refused(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu")
    assert "tokenizer" in line and str(tmp_path) in line


def test_directory_without_config(capsys, tmp_path, no_loading):
    assert "no config.json" in refused(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")


@pytest.mark.parametrize("command", ["generate", "info"])
@pytest.mark.parametrize("model_type", ["gpt2", "no_such_architecture"])
def test_unsupported_architecture(capsys, tmp_path, no_loading, command, model_type):
    model = unsupported_dir(tmp_path, model_type)
    line = refused(capsys, command, "--model", model, *REQUIRED[command])
    assert f"'{model_type}' is not supported" in line
    assert all(name in line for name in SUPPORTED_TYPES)


def test_unknown_or_missing_device(capsys, no_loading):
    assert "unknown device 'nonsense'" in refused(capsys, "generate", "--prompt", "hi", "--device", "nonsense")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in refused(capsys, "generate", "--prompt", "hi", "--device", "cuda")


def test_info_plans_for_a_cuda_device_anywhere(capsys):
    code, out, err = run(capsys, "info", "--model", "random:llama-3.2-1b", "--context", "4k", "--device", "cuda")
    assert code == 0, err
    assert "dtype         bfloat16" in out


def test_unknown_preset(capsys):
    line = refused(capsys, "info", "--model", "random:nope", "--context", "4k")
    assert "unknown preset 'nope'" in line and "llama-3-8b" in line


def test_random_model_cannot_generate(capsys, no_loading):
    assert "no tokenizer" in refused(capsys, "generate", "--model", "random:llama-3-8b")


def test_empty_prompt(capsys, no_loading):
    assert "prompt is empty" in refused(capsys, "generate", "--prompt", "  \n")


def test_empty_prompt_file(capsys, tmp_path, no_loading):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    line = refused(capsys, "generate", "--prompt-file", str(empty))
    assert "empty" in line and str(empty) in line


def test_empty_prompt_on_stdin(capsys, monkeypatch, no_loading):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert "standard input is empty" in refused(capsys, "generate", "--prompt-file", "-")


def test_prompt_file_is_a_directory(capsys, tmp_path, no_loading):
    assert "is a directory" in refused(capsys, "generate", "--prompt-file", str(tmp_path))


def test_missing_prompt_file(capsys, tmp_path, no_loading):
    line = refused(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert "does not exist" in line and "missing.txt" in line


def test_json_into_missing_directory(capsys, tiny_model, tmp_path, no_loading):
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi",
                   "--json", str(tmp_path / "no" / "out.json"))
    assert "--json" in line and "does not exist" in line


def test_gpu_heads_beyond_kv_heads_checked_up_front(capsys, tiny_model, no_loading):
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi",
                   "--gpu-heads", str(TINY_KV_HEADS + 1))
    assert f"gpu_heads must be between 0 and {TINY_KV_HEADS}" in line and str(TINY_KV_HEADS + 1) in line


def test_gpu_heads_beyond_kv_heads_in_info(capsys):
    line = refused(capsys, "info", "--model", "random:llama-3-8b", "--context", "4k", "--gpu-heads", "9")
    assert "gpu_heads must be between 0 and 8" in line and "got 9" in line


def test_context_beyond_positions_in_generate(capsys, tiny_model):
    argv = ["generate", "--model", tiny_model, "--prompt", "Hello " * TINY_POSITIONS, "--max-new-tokens", "1"]
    line = refused(capsys, *argv)
    assert f"exceed the model's {TINY_POSITIONS} positions" in line and "--allow-beyond-positions" in line
    code, _, err = run(capsys, *argv, "--allow-beyond-positions")
    assert code == 0, err


def test_generated_tokens_count_against_positions(capsys, tiny_model):
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "Hello there",
                   "--max-new-tokens", str(TINY_POSITIONS))
    assert "--allow-beyond-positions" in line


def test_context_beyond_positions_in_info(capsys):
    code, out, err = run(capsys, "info", "--model", "random:llama-3-8b", "--context", "1m")
    assert code == 2
    line = error_line(err)
    assert "1,048,576 tokens exceed the model's 131,072 positions" in line and "--allow-beyond-positions" in line
    assert "offload" in out  # the numbers are still printed


def test_not_enough_host_ram_in_info(capsys, little_ram):
    line = refused(capsys, "info", "--model", "random:llama-3.2-1b", "--context", "32k")
    assert "not enough host RAM" in line


def test_not_enough_host_ram_in_generate(capsys, tiny_model, little_ram):
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "Hello " * 5, "--max-new-tokens", "2")
    assert "not enough host RAM" in line


def test_errors_are_one_line_from_the_console_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "headspace", "generate", "--model", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [error_line(done.stderr)]


# -- info -----------------------------------------------------------------------------------------

def parse_info(out: str) -> dict:
    numbers = {}
    for line in out.splitlines():
        found = [int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) bytes", line)]
        key = line.split("  ")[0].strip()
        if key in ("full", "offload"):
            numbers[key] = tuple(found)
        elif key in ("KV per token", "weights"):
            numbers[key] = found[0]
            if key == "weights":
                numbers["parameters"] = int(re.search(r"([\d,]+) parameters", line).group(1).replace(",", ""))
    return numbers


@pytest.mark.parametrize(("model", "context", "tokens", "dtype", "gpu_heads", "group_heads"), [
    ("random:llama-3-8b", "32k", 32768, "bfloat16", 2, 2),
    ("random:qwen2.5-7b", "4096", 4096, "float16", 0, 3),
    ("random:llama-3.2-1b", "128k", 131072, "float32", 1, 1),
    ("random:mistral-7b", "1m", 2**20, "bfloat16", 1, None),  # automatic group size
])
def test_info_prints_the_kv_arithmetic(capsys, monkeypatch, model, context, tokens, dtype, gpu_heads, group_heads):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**50))  # RAM is no limit
    group = ["--group-heads", str(group_heads)] if group_heads else []
    code, out, err = run(capsys, "info", "--model", model, "--context", context, "--dtype", dtype,
                         "--gpu-heads", str(gpu_heads), *group, "--allow-beyond-positions")
    assert code == 0, err
    assert f"group_heads={group_heads or 'auto'}" in out
    # the arithmetic, written out from the preset's published shape (no sliding windows in these presets)
    preset = PRESETS[model.removeprefix("random:")]
    layers, kv = preset["num_hidden_layers"], preset["num_key_value_heads"]
    dim = preset.get("head_dim") or preset["hidden_size"] // preset["num_attention_heads"]
    row = 2 * dim * getattr(torch, dtype).itemsize  # keys and values of one head, one token
    streamed = min(group_heads or max(1, 2**30 // (2 * row * tokens)), kv - gpu_heads)
    numbers = parse_info(out)
    assert numbers["KV per token"] == layers * kv * row
    assert numbers["full"] == (layers * kv * row * tokens, 0)
    assert numbers["offload"] == (layers * gpu_heads * row * tokens + 2 * streamed * row * tokens,
                                  layers * (kv - gpu_heads) * row * tokens)
    assert numbers["weights"] == numbers["parameters"] * getattr(torch, dtype).itemsize
    assert f"context       {tokens:,} tokens" in out


def test_info_weights_count_parameters(capsys, tiny_model):
    code, out, err = run(capsys, "info", "--model", tiny_model, "--context", "64")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert parse_info(out)["parameters"] == sum(p.numel() for p in model.parameters())


def test_info_llama_3_8b_has_8b_parameters(capsys):
    code, out, err = run(capsys, "info", "--model", "random:llama-3-8b", "--context", "1k", "--dtype", "bfloat16")
    assert code == 0, err
    assert parse_info(out)["parameters"] == 8_030_261_248
    assert "KV per token  128.00 KiB (131,072 bytes)" in out


# -- generate -------------------------------------------------------------------------------------

def test_generate_streams_and_writes_json(capsys, tiny_model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 2)
    result_files = {}
    for mode in ("full", "offload"):
        result_files[mode] = tmp_path / f"{mode}.json"
        code, out, err = run(capsys, "generate", "--model", tiny_model, "--prompt-file", str(prompt),
                             "--mode", mode, "--chunk-size", "4", "--max-new-tokens", "5",
                             "--json", str(result_files[mode]))
        assert code == 0, err
        record = json.loads(result_files[mode].read_text())
        assert out == record["text"] + "\n"  # streamed token by token, then a newline
        assert 1 <= len(record["token_ids"]) <= 5
        assert record["stats"]["prompt_tokens"] > 4  # several prefill chunks
        assert record["stats"]["new_tokens"] == len(record["token_ids"])
        assert "prefill" in err and "tok" in err  # the progress bar
        assert err.rstrip().splitlines()[-1].startswith("prefill ")  # the summary line comes last
        assert "built-in" not in err
    full, offload = (json.loads(result_files[m].read_text()) for m in ("full", "offload"))
    assert full["token_ids"] == offload["token_ids"]  # offloading is exact
    assert offload["stats"]["host_kv_bytes"] > 0 and full["stats"]["host_kv_bytes"] == 0


def test_generate_with_an_automatic_host_split_is_exact(capsys, tiny_model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Pack my box with five dozen liquor jugs.")
    records = {}
    for name, extra in (("full", ["--mode", "full"]), ("auto", ["--mode", "offload", "--cpu-heads", "auto"])):
        code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt-file", str(prompt), "--chunk-size",
                           "8", "--max-new-tokens", "12", "--json", str(tmp_path / f"{name}.json"), *extra)
        assert code == 0, err
        records[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert records["auto"]["token_ids"] == records["full"]["token_ids"]
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt-file", str(prompt), "--cpu-heads", "many")
    assert code == 2 and "--cpu-heads" in err and "'many' is not an integer" in err


def test_streamed_pieces_add_up_to_the_final_text_for_multibyte_characters(monkeypatch, byte_tokenizer):
    tokenizer = byte_tokenizer
    ids = tokenizer("Café 日本語 ok", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("Café 日本語 ok".encode()) // 2  # multi-byte characters span several tokens
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    engine = Engine(AutoModelForCausalLM.from_config(config).eval(), tokenizer, mode="offload")
    script = iter(ids)
    monkeypatch.setattr(headspace.engine.engine, "pick", lambda *args: next(script))
    pieces = []
    result = engine.generate("Hello", max_new_tokens=len(ids), stop_on_eos=False,
                             on_token=lambda token, piece: pieces.append(piece))
    assert result.text == "Café 日本語 ok"
    assert "".join(pieces) == result.text
    assert "\ufffd" not in "".join(pieces)


def test_generate_sampling_is_seeded(capsys, tiny_model):
    argv = ["generate", "--model", tiny_model, "--prompt", "Once upon a time", "--max-new-tokens", "6",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    code, first, err = run(capsys, *argv)
    assert code == 0, err
    assert run(capsys, *argv)[1] == first
    others = {run(capsys, *argv[:-1], str(seed))[1] for seed in (4, 5, 6)}
    assert others - {first}, "other seeds sample the same text"


@pytest.mark.slow
def test_generate_default_prompt_finds_the_passkey():
    """`headspace generate` with no prompt: the real SmolLM2 retrieves the pass key from ~4K tokens."""
    done = subprocess.run([sys.executable, "-m", "headspace", "generate", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert "68142" in done.stdout
    assert "built-in example" in done.stderr
    assert "prefill" in done.stderr and "decode" in done.stderr and "KV" in done.stderr
    assert "Traceback" not in done.stderr
