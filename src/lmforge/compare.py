"""`lmforge compare CONFIG --methods full,lora,adalora,adapter,prefix`: one task, several ways to
fine-tune it, side by side.

    for each method: `lmforge finetune CONFIG peft.method=METHOD run.name=<name>-<method> ...`
                     in its own process (so that its peak memory is its own) -> <run>/summary.json
    <dir>/<name>-compare/: compare.md (table), compare.json, compare.png (bars: trainable parameters,
                           peak memory, wall time, the metric)

Overrides apply to every method; `METHOD:key=value` to one only (e.g. `lora:train.lr=5e-4`: PEFT
methods usually want a larger learning rate than full fine-tuning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .finetune import FinetuneConfig

METHODS = ("full", "lora", "adalora", "adapter", "prefix", "prompt", "ia3")
COLUMNS = [("trainable_params", "trainable parameters"), ("peak_memory_mb", "peak memory (MB)"),
           ("wall_s", "wall time (s)")]


def split_overrides(overrides: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every method, {method: its own overrides}) from `key=v` and `method:key=v`."""
    common, own = [], {m: [] for m in methods}
    for item in overrides:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            if head not in own:
                raise ConfigError(f"{item}: {head!r} is not one of the compared methods ({', '.join(methods)})")
            own[head].append(rest)
        else:
            common.append(item)
    return common, own


def run_method(config: str, method: str, name: str, overrides: list[str]) -> dict:
    """Fine-tune with one method in a child process; its summary.json."""
    cfg = load_config(FinetuneConfig, config, overrides)  # fail here, on a bad key, not in the child
    peft = "none" if method == "full" else method
    args = [sys.executable, "-m", "lmforge", "finetune", config, *overrides, f"peft.method={peft}",
            f"run.name={name}-{method}"]
    print(f"== {method}: {' '.join(args[3:])}", file=sys.stderr, flush=True)
    done = subprocess.run(args, env=os.environ.copy(), check=False)
    if done.returncode != 0:
        raise ValueError(f"the {method} run failed (exit {done.returncode}); see the output above")
    return json.loads((Path(cfg.run.dir) / f"{name}-{method}" / "summary.json").read_text())


def compare(config: str, methods: list[str], overrides: list[str]) -> Path:
    """Run every method; write the table, JSON and plot; returns the comparison folder."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    common, own = split_overrides(overrides, methods)
    cfg = load_config(FinetuneConfig, config, common)
    rows = [run_method(config, m, cfg.run.name, [*common, *own[m]]) for m in methods]
    folder = Path(cfg.run.dir) / f"{cfg.run.name}-compare"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "compare.md").write_text(table(rows, methods) + "\n")
    plot(rows, methods, folder / "compare.png")
    return folder


def table(rows: list[dict], methods: list[str]) -> str:
    """A Markdown table: one row per method."""
    metric = rows[0]["metric"]
    head = ["method", *(title for _, title in COLUMNS), f"best {metric}", "at step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in zip(methods, rows, strict=True):
        share = f" ({100 * r['trainable_params'] / r['total_params']:.2f}%)"
        cells = [method, f"{r['trainable_params']:,}{share}", f"{r['peak_memory_mb']:.0f}", f"{r['wall_s']:.0f}",
                 _num(r["best"]), str(r["best_step"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    """Four bar charts side by side (trainable parameters on a log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are an optional extra: pip install lmforge[train]
        return
    metric = rows[0]["metric"]
    panels = [*COLUMNS, ("best", f"best {metric}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=110)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(methods, [r[key] or 0 for r in rows], color="#4c72b0")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if key == "trainable_params":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
