"""Where a run's numbers go: metrics.jsonl, TensorBoard event files, and a progress bar.

Only the chief process (process 0) writes; the others get a writer that does nothing.
"""

import json
import math
import sys
import time
from pathlib import Path

import tqdm
from absl import logging


class MetricsWriter:
    """Appends one JSON object per logged point to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._written: set[tuple[int, str]] = set()
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Drops records logged after `step` (a resumed run logs them again) and lines that are
        not whole records (a run killed mid-write); remembers what is kept, so that a record
        of a (step, split) already written is not written twice."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_records(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._written = {(r["step"], r.get("split")) for r in kept}

    def write(self, record: dict) -> None:
        """Writes `record` (must hold 'step' and 'split'; numbers go to TensorBoard too), unless
        a record of the same step and split is already there (written before a resume)."""
        if not self.enabled:
            return
        key = (record["step"], record["split"])
        if key in self._written:
            return
        self._written.add(key)
        record = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])
        self._tb.flush()  # a run killed later keeps what it logged in its event file

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_records(path: str | Path) -> list[dict]:
    """Returns the records of a metrics.jsonl, dropping (with one warning) lines that are not
    whole records: the last line of a run killed while writing it, or a hand-edited line."""
    records, dropped = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            dropped.append(number)
    if dropped:
        logging.warning(
            "%s: dropped %d line(s) that are not whole records (line %s): a run killed while "
            "writing, or a hand edit",
            path,
            len(dropped),
            ", ".join(map(str, dropped[:5])),
        )
    return records


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class Progress:
    """A tqdm bar on a terminal (chief only); a periodic log line otherwise."""

    def __init__(self, total: int, initial: int, *, mode: str = "auto", enabled: bool = True):
        show_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.enabled = enabled
        self.total = total
        self.bar = (
            tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            if show_bar
            else None
        )
        self._start = time.perf_counter()
        self._start_step = initial

    def update(self, step: int, **postfix) -> None:
        """Moves the bar to `step` and shows `postfix` (loss, accuracy, ...)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self.enabled:
            elapsed = time.perf_counter() - self._start
            rate = (step - self._start_step) / max(elapsed, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            values = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
            logging.info(
                "step %d/%d  %.2f steps/s  eta %.0fs  %s", step, self.total, rate, eta, values
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
