"""What a run reports while it trains: metrics files and the console.

``MetricWriter`` appends one JSON line per log step or evaluation to ``metrics.jsonl`` (what notebooks
read) and mirrors scalars into TensorBoard event files through tensorboardX (no TensorFlow).
``Progress`` draws a tqdm bar with steps/s, ETA and loss on a terminal, and prints plain lines when
stdout is a file or pipe, so CI logs stay readable.
"""

import json
import math
import sys
import time
from pathlib import Path

import tensorboardX
import tqdm

from medjax.errors import CheckpointError


class MetricWriter:
    """Appends metrics to a JSON-lines file and TensorBoard event files (a run's ``metrics.jsonl`` and
    ``tensorboard/``, see :mod:`medjax.run_dir`).

    A resumed run first cuts the file back to what its checkpoint had seen: the first ``resume_lines``
    lines (the count the checkpoint recorded, :attr:`lines`), or, for checkpoints without that count, the
    lines of steps up to ``resume_step``. Lines after that are redone by the replay. A last line cut short
    by a kill mid-write is dropped; a damaged line elsewhere names the file and line.
    """

    def __init__(
        self, path: Path, tensorboard_dir: Path, *, resume_step: int = 0, resume_lines: int | None = None
    ):
        self.path = Path(path)
        self.lines = self._cut_back(resume_step, resume_lines)
        self._tb = tensorboardX.SummaryWriter(str(tensorboard_dir))

    def _cut_back(self, step: int, lines: int | None) -> int:
        """Rewrites the file to the lines a run resumed at ``step`` keeps; returns their count."""
        if not self.path.exists():
            return 0
        records = read_metrics(self.path)
        kept = records[:lines] if lines is not None else [r for r in records if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
        return len(kept)

    def write(self, step: int, kind: str, scalars: dict) -> None:
        """Writes ``scalars`` (numbers; lists such as confusion matrices go to JSON only)."""
        record = {"step": int(step), "kind": kind, **scalars}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        self.lines += 1
        for key, value in scalars.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, dropping a last line that a kill cut short.

    Raises:
      CheckpointError: naming the file and line of a damaged line that is not the last.
    """
    text = Path(path).read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # Torn by a kill mid-write: the replay writes it again.
            raise CheckpointError(
                f"{path}:{number}: damaged line ({e}); delete that line (or the file) and rerun."
            ) from e
    return records


class Progress:
    """Console progress for steps ``initial..total``: a bar on a terminal, plain lines otherwise."""

    def __init__(self, *, total: int, initial: int, every: int, enabled: bool = True):
        self.total, self.every = total, max(1, every)
        self._interactive = enabled and sys.stdout.isatty()
        self._bar = (
            tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            if self._interactive
            else None
        )
        self._t0, self._step0 = time.perf_counter(), initial

    def update(self, step: int, **values: float) -> None:
        """Called after each completed ``step`` (1-based count of steps done)."""
        if self._bar is not None:
            self._bar.update(1)
            if step % self.every == 0:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            return
        if step % self.every == 0 or step == self.total:
            rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"step {step}/{self.total}  {shown}  {rate:.2f} steps/s  ETA {_hms(eta)}", flush=True)

    def message(self, text: str) -> None:
        """Prints a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
