"""``--compile-layers`` on the command line: generate decodes the same tokens with it, and the bench takes it for
every cell or per cell (``/compiled``) and records it."""

from __future__ import annotations

import json
import shutil

import pytest
from test_bench import tiny
from test_cli import run, tiny_model  # noqa: F401  (tiny_model: a fixture)

from headspace import bench

# torch.compile of CPU models writes C++: skipped where no compiler is installed (a bare GPU machine)
pytestmark = [pytest.mark.usefixtures("cpu_default_device"),
              pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for torch.compile on a CPU")]


def test_generate_with_compiled_layers_decodes_the_same_tokens(capsys, tiny_model, tmp_path):  # noqa: F811
    tokens = {}
    for flags in ([], ["--compile-layers"]):
        out = tmp_path / f"{len(flags)}.json"
        code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt", "Pack my box with five dozen jugs.",
                           "--chunk-size", "4", "--max-new-tokens", "6", "--gpu-heads", "2", "--cuda-graphs", "on",
                           *flags, "--json", str(out))
        assert code == 0, err
        tokens[len(flags)] = json.loads(out.read_text())["token_ids"]
    assert tokens[1] == tokens[0]


def test_bench_takes_compiled_layers_per_cell_and_records_the_flag(monkeypatch, tmp_path):
    assert bench.mode_options("offload/gpuauto/compiled", "auto", None, None)[1]["compile_layers"] is True
    assert "compile_layers" not in bench.mode_options("offload/gpuauto", "auto", None, None)[1]
    monkeypatch.setattr(bench, "random_model", tiny)
    out = tmp_path / "bench.json"
    code = bench.main(["--contexts", "300", "--modes", "offload/gpu4/graphs/compiled", "--chunk-size", "128",
                       "--decode-steps", "3", "--json", str(out), "--device", "cpu", "--compile-layers"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["compile_layers"] is True
    assert [cell["error"] for cell in result["cells"]] == [None]
