"""Where a decode step's time goes when the host CPU attends a share of every offloaded head.

Runs one ``headspace bench`` cell (Llama-3-8B architecture, random weights, synthetic prefix) with
the host jobs and each layer's ``attend`` timed: per job, when its query was there and when its
output was written (the compiled kernel's own clock: a job handed over by flags begins, and
waits for its query, while the job before still runs), so the host's idle time between jobs is
the gap from one job's output to the next one's query; over the timed steps, the host's rate in
place (bytes attended / time attending) against the ceiling measured before the run.

    python3 benchmarks/host_timeline.py --context 1m --json results/h100_host_timeline_1m.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

import headspace.kv.layers as layers
from headspace import bench
from headspace.units import parse_tokens

LAYERS = 32  # of the preset: each decode step attends this many layers


def instrument(events: list[tuple]) -> None:
    """Time the host jobs (query there, output written) and every layer's attend, into ``events``."""
    job, kernel, attend = layers.attend_on_host, layers.host_decode_lse, layers.OffloadLayer.attend
    local = threading.local()

    def timed_kernel(*args, **kwargs):
        times = torch.zeros(2, dtype=torch.float64)
        result = kernel(*args, times=times, **kwargs)
        if result is not None:  # None: the kernel did not take the job, and torch attends it
            local.times = (float(times[0]), float(times[1]))
        return result

    def timed_job(task):
        local.times = None
        start = time.monotonic()
        job(task)
        ready, end = local.times or (start, time.monotonic())  # the torch path: from the job's start
        nbytes = sum(2 * keys.numel() * keys.element_size() for keys, _ in (task.front_spans or []))
        events.append(("host", start, ready, end, nbytes))

    def timed_attend(self, query, scaling, staging, phase, after=None):
        start = time.monotonic()
        out = attend(self, query, scaling, staging, phase, after)
        events.append(("layer", start, time.monotonic()))
        return out

    layers.attend_on_host, layers.host_decode_lse, layers.OffloadLayer.attend = timed_job, timed_kernel, timed_attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=parse_tokens, default="1m")
    parser.add_argument("--mode", default="offload/gpuauto/cpuauto")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("host_timeline.json"))
    args = parser.parse_args()
    events: list[tuple] = []
    instrument(events)
    device = torch.device("cuda")
    ceilings = bench.measure_ceilings(device)
    modes = {args.mode: bench.mode_options(args.mode, "auto", None, None)}
    cell = bench.run("llama-3-8b", [args.context], modes, 4096, args.decode_steps, 0, device, ceilings)[0]
    print(bench.row(cell))
    timed = args.decode_steps * LAYERS
    jobs = sorted((e for e in events if e[0] == "host"), key=lambda e: e[2])[-timed:]
    calls = [e for e in events if e[0] == "layer"][-timed:]
    busy = sum(end - ready for _, _, ready, end, _ in jobs)
    nbytes = sum(e[4] for e in jobs)
    result = dict(context=args.context, mode=args.mode, host_share=cell.host_share,
                  decode_tokens_per_s=cell.decode_tokens_per_s, bound=cell.decode_bound_tokens_per_s,
                  seconds=calls[-1][2] - calls[0][1], host_attending=busy,
                  host_between_jobs=sum(b[2] - a[3] for a, b in zip(jobs, jobs[1:])), host_bytes=nbytes,
                  host_rate_in_place=nbytes / busy if busy else None,
                  host_rate_ceiling=ceilings["host_attention_bytes_per_s"],
                  layers_attend_seconds=sum(end - start for _, start, end in calls),
                  first_jobs_ms=[(round((r - jobs[0][2]) * 1e3, 2), round((e - r) * 1e3, 2))
                                 for _, _, r, e, _ in jobs[:40]],
                  first_layers_ms=[(round((s - jobs[0][2]) * 1e3, 2), round((e - s) * 1e3, 2))
                                   for _, s, e in calls[:40]])
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("first_")}, indent=1))
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
