"""A run is a folder: `runs/<name>/` with the resolved config, metrics, TensorBoard events, plots, a
report, checkpoints and the final model. Only the main process (rank 0) writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class Run:
    """The folder of one training run and the metrics written into it.

    Args:
        folder: `run.dir / run.name`.
        main: whether this process writes (rank 0); other ranks get a Run that writes nothing.
        resume: continue an existing run; without it, a folder holding a previous run is an error
            (nothing a user ran before is overwritten).
    """

    def __init__(self, folder: Path, main: bool = True, resume: bool = False):
        self.folder, self.main = Path(folder), main
        self.metrics_path = self.folder / "metrics.jsonl"
        self._tensorboard = None
        if not main:
            return
        if self.metrics_path.exists() and not resume:
            raise FileExistsError(f"{self.folder} already holds a run; continue it with resume=true "
                                  "(or --resume), or choose another run.name")
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> Path | None:
        """Write a file of the run atomically (temp file + rename)."""
        if not self.main:
            return None
        path = self.folder / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl and mirror the numbers to TensorBoard."""
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, record["step"])

    def _writer(self):
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._tensorboard = False
                return None
            self._tensorboard = SummaryWriter(str(self.folder / "tensorboard"))
        return self._tensorboard or None

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric lines written after the checkpoint we continue from."""
        if not self.main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.write_text("metrics.jsonl", "".join(line + "\n" for line in kept))

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()


class Timer:
    """Wall time and tokens per second over a logging interval."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.tokens = 0

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.mark, 1e-9)
        self.mark, self.tokens = now, 0
        return rate

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
