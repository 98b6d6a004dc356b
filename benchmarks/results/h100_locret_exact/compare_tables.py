"""The locret columns of the tables before (chunked prefill, commit e33ee87) and after the default became the exact
prefill with merged summaries; the old markdown tables are read from the folder given, e.g.

    mkdir -p /tmp/old && for f in benchmarks/results/eval_*.md; do git show e33ee87:$f > /tmp/old/$(basename $f); done
    python3 benchmarks/results/h100_locret_exact/compare_tables.py /tmp/old > compare_tables.md
"""

import sys

BASELINES = ["streamingllm", "snapkv", "snapkv-question", "expected-attention", "tova", "knorm", "h2o", "pyramidkv",
             "random"]
TABLES = [("smollm2-135m", "4k"), ("smollm2-135m", "8k"), ("gemma3-270m", "8k"), ("gemma3-270m", "16k"),
          ("gemma3-270m", "32k")]
ROWS = ("needle tasks (mean)", "all tasks (mean)", "held-out family (mean)", "held-out digits kept (mean)")


def rows(path: str) -> dict[str, dict[str, str]]:
    """A markdown table written by ``headspace eval``: its first column's label -> {column: cell}."""
    lines = [line for line in open(path) if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|\n").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|\n").split("|")]
        table[cells[0]] = dict(zip(head[1:], cells[1:], strict=True))
    return table


def main(old_folder: str) -> None:
    print("| model | tokens | setting | row | full | chunked locret 4x | locret 4x | chunked locret 8x | locret 8x "
          "| best baseline 8x |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for model, length in TABLES:
        new = rows(f"benchmarks/results/eval_{model}_{length}.md")
        old = rows(f"{old_folder}/eval_{model}_{length}.md")
        for setting, suffix in (("inside", ""), ("after", " [after]")):
            for row in ROWS:
                now, before = new[row + suffix], old[row + suffix]
                best = max(BASELINES, key=lambda name: float(now[f"{name}@8x"]))
                print(f"| {model} | {length} | {setting} | {row} | {now['full']} | {before['locret@4x']} | "
                      f"{now['locret@4x']} | {before['locret@8x']} | {now['locret@8x']} | {now[best + '@8x']} "
                      f"({best}) |")


if __name__ == "__main__":
    main(sys.argv[1])
