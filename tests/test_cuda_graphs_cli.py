"""``--cuda-graphs`` on the command line: generate decodes the same tokens with it on, refuses it for a plan
that offloads heads (one error line, exit 2), and the bench records it per cell and in its metadata."""

from __future__ import annotations

import json

import pytest
from test_bench import tiny
from test_cli import refused, run, tiny_model  # noqa: F401  (tiny_model: a fixture)

from headspace import bench

pytestmark = pytest.mark.usefixtures("cpu_default_device")


def test_generate_with_cuda_graphs_on_decodes_the_same_tokens(capsys, tiny_model, tmp_path):  # noqa: F811
    tokens = {}
    for setting in ("off", "on"):
        out = tmp_path / f"{setting}.json"
        code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt", "Pack my box with five dozen jugs.",
                           "--chunk-size", "4", "--max-new-tokens", "6", "--gpu-heads", "2", "--cuda-graphs",
                           setting, "--json", str(out))
        assert code == 0, err
        tokens[setting] = json.loads(out.read_text())["token_ids"]
    assert tokens["on"] == tokens["off"]


def test_cuda_graphs_on_with_offloaded_heads_is_refused(capsys, tiny_model):  # noqa: F811
    line = refused(capsys, "generate", "--model", tiny_model, "--prompt", "hi", "--max-new-tokens", "4",
                   "--gpu-heads", "1", "--cuda-graphs", "on")
    assert line.startswith("headspace: error: cuda_graphs=True needs every KV head on the GPU")


def test_bad_cuda_graphs_value_is_refused(capsys):
    assert "--cuda-graphs" in refused(capsys, "generate", "--prompt", "hi", "--cuda-graphs", "maybe")


def test_bench_records_cuda_graphs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "random_model", tiny)
    out = tmp_path / "bench.json"
    code = bench.main(["--contexts", "300", "--modes", "full,offload/gpu4", "--chunk-size", "128",
                       "--decode-steps", "3", "--json", str(out), "--device", "cpu", "--cuda-graphs", "on"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["cuda_graphs"] == "on"
    cells = {cell["mode"]: cell for cell in result["cells"]}
    assert all(cell["error"] is None for cell in cells.values())
    assert not any(cell["cuda_graph"] for cell in cells.values())  # a CPU has no graphs to replay


def test_bench_modes_choose_graphs_per_cell(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "random_model", tiny)
    assert bench.mode_options("offload/gpuauto/eager", "auto", None, None)[1]["cuda_graphs"] is False
    assert bench.mode_options("offload/graphs", "auto", None, None)[1]["cuda_graphs"] is True
    out = tmp_path / "bench.json"
    code = bench.main(["--contexts", "300", "--modes", "offload/gpu4/graphs,offload/gpu1/graphs,offload/gpu4/eager",
                       "--chunk-size", "128", "--decode-steps", "3", "--json", str(out), "--device", "cpu"])
    assert code == 0
    cells = {cell["mode"]: cell for cell in json.loads(out.read_text())["cells"]}
    assert cells["offload/gpu4/graphs"]["error"] is None and cells["offload/gpu4/eager"]["error"] is None
    assert cells["offload/gpu1/graphs"]["error"].startswith("cuda_graphs=True needs every KV head on the GPU")
