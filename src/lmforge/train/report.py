"""The end of a run: PNG plots of its curves and a `report.md` a person reads first."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import to_yaml


def _pyplot():
    """matplotlib.pyplot drawing to files (no display), or None: plots are an optional extra
    (`pip install lmforge[train]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(folder: Path, records: list[dict], metric: str | None = None) -> list[str]:
    """loss.png (train and validation), lr.png, and perplexity.png or, when the run follows a task
    metric (accuracy, f1, bleu, ...), <metric>.png; returns the file names written."""
    plt = _pyplot()
    if plt is None:
        return []
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    curves = {
        "loss.png": ("loss", [("train", train, "loss"), ("validation", val, "val_loss")]),
        "perplexity.png": ("perplexity", [("validation", val, "val_ppl")]),
        "lr.png": ("learning rate", [("lr", train, "lr")]),
    }
    if metric and not metric.startswith(("val_loss", "val_ppl")):  # a task metric replaces perplexity
        del curves["perplexity.png"]
        curves[f"{metric}.png"] = (metric, [("validation", [r for r in val if metric in r], metric)])
    written = []
    for name, (ylabel, series) in curves.items():
        if not any(rows for _, rows, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for label, rows, key in series:
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label,
                        marker="o" if len(rows) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(name)
    return written


def plot_confusion(path: Path, matrix: list[list[int]], labels: list[str], title: str = "") -> bool:
    """A confusion matrix as a PNG: rows = gold label, columns = predicted, each cell its count
    (shaded by the share of its row). False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    shares = [[n / max(sum(row), 1) for n in row] for row in matrix]
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 0.8, size), dpi=110)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 2 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(run, cfg, model, state: dict, wall_seconds: float) -> Path | None:
    """Write `report.md`: what was trained, on what, how it went, where the results are."""
    records = run.records()
    metric = getattr(getattr(cfg, "train", None), "metric", None)
    plots = plot_curves(run.folder, records, metric) if run.main else []
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    val = [r for r in records if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    source = (getattr(cfg.model, "preset", None) or getattr(cfg.model, "init_from", None)
              or getattr(cfg.model, "path", None) or "")
    task = getattr(cfg, "task", None)
    objective = getattr(task, "objective", None) or getattr(task, "kind", "?")
    method = getattr(getattr(cfg, "peft", None), "method", "none")
    if method != "none":
        objective += f", peft {method}"
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    sizes = f"{params / 1e6:.2f}M parameters" + (
        f", {trainable / 1e6:.3f}M trained ({100 * trainable / params:.2f}%)" if trainable != params else "")
    lines = [
        f"# Run `{run.folder.name}`", "",
        f"- model: {type(model).__name__} ({source}), {sizes}",
        f"- objective: {objective}, {state.get('step', 0)} steps, {state.get('tokens', 0):,} tokens",
        f"- wall time: {duration(wall_seconds)} (training {duration(state.get('elapsed', 0.0))})",
        f"- final training loss: {_num(state.get('loss'))}",
    ]
    if best is not None:
        last = val[-1]
        lines.append(f"- validation: last loss {_num(last['val_loss'])} (perplexity {_num(last['val_ppl'])}), "
                     f"best {_num(best['val_loss'])} at step {best['step']}")
    if metric and state.get("best") is not None and not metric.startswith(("val_loss", "val_ppl")):
        lines.append(f"- {metric}: last {_num(state.get(metric))}, best {_num(state['best'])} at step "
                     f"{state.get('best_step')}" + (" (the exported weights)" if cfg.train.patience else ""))
    if plots:
        lines += ["", "## Curves", "", *(f"![{p}]({p})" for p in plots)]
    load_hint = "(`lmforge.load(\"<run>/final\")`, or `transformers.AutoModel*.from_pretrained`)"
    lines += ["", "## Files", "",
              f"- `final/` — the trained model and tokenizer in Hugging Face layout {load_hint}",
              "- `step-N/` — checkpoints to resume from (`resume=true`)",
              "- `metrics.jsonl` — one JSON object per logged step; `tensorboard/` — the same for TensorBoard",
              "- `config.yaml` — the resolved configuration of this run", "",
              "## Configuration", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    return run.write_text("report.md", "\n".join(lines))


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


def duration(seconds: float) -> str:
    """`1 min 5 s`, or `42 s` under a minute."""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"
