"""A worker's progress: one definition of throughput, shown as a bar on a terminal and as plain
log lines elsewhere (nohup, Slurm, `> run.log 2>&1`).

Throughput is the job's work per second of the unit loop, from its first unit on, so model load
and preparation never count; the job names its unit of work (`traj-steps/s` for `run`,
`points/s` for `profile`) and that one label is used by the bar, the log lines, the summary and
the progress record that `status` reads.
"""

from __future__ import annotations

import resource
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from calibjob.core.words import fmt_eta, plural

LOG_EVERY_S = 30.0


def peak_memory_gb() -> float:
    """The most memory MLX has held in this process since its last reset (GB): on a Mac the
    machine's own memory, shared with the GPU. Without MLX loaded, the peak resident set. Never
    the first to import MLX: calibjob.device must (OpenBLAS first, or the CPU's arithmetic, and
    so the data, would differ from a worker whose MLX it loaded)."""
    mx = sys.modules.get("mlx.core")
    try:
        return mx.get_peak_memory() / 1e9
    except Exception:  # noqa: BLE001  (no MLX loaded, or an old one)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, B on macOS
        return rss / (1e9 if sys.platform == "darwin" else 1e6)


def announce_start(
    shard: str, rows: int, units: int, row_word: str, model: str, mode: bool | None,
    console: Console,
) -> None:
    """A worker's first line, before DiffusionKit imports and the model loads (seconds on a CPU,
    a minute or more for SD3's weights): it says at once what it took on. Silent under
    --no-progress, like the progress lines it precedes (and starting as they do)."""
    if mode is False:
        return
    print(
        f"calibjob: shard {shard}: {plural(rows, row_word)} in "
        f"{plural(units, 'unit')} to compute; loading {model}",
        file=console.file,
        flush=True,
    )


class ShardProgress:
    """Counts a shard's rows and work and shows them (bar, log lines, or nothing)."""

    def __init__(
        self,
        shard: str,
        rows: int,
        work: int,
        mode: bool | None,
        console: Console,
        *,
        row_word: str = "trajectory",
        label: str = "traj-steps/s",
    ):
        self.shard, self.nrows, self.work = shard, rows, work
        self.row_word, self.label = row_word, label
        self.console = console
        tty = console.file.isatty() if hasattr(console.file, "isatty") else False
        # None: a bar on a terminal, log lines otherwise; --progress forces the bar,
        # --no-progress silences both
        self.bar = (mode is None and tty) or mode is True
        self.lines = mode is None and not tty
        self.done_work = 0
        self.done_rows = 0
        self.t0: float | None = None
        self._last_line = -1e9
        rows_word = plural(2, row_word).split(" ", 1)[1]
        self._progress = Progress(
            TextColumn("[bold]shard {task.fields[shard]}"),
            BarColumn(),
            TextColumn("{task.fields[rows]}/{task.fields[nrows]} " + rows_word),
            TextColumn("{task.fields[rate]} " + label + ", ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.bar,
        )
        self._task = None

    def __enter__(self) -> ShardProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task(
            "run", total=self.work, shard=self.shard, rows=0, nrows=self.nrows, rate="-", eta="-"
        )
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self) -> None:
        """The unit loop begins: throughput counts from here."""
        self.t0 = time.perf_counter()

    @property
    def rate(self) -> float:
        """Throughput so far (work per second of the unit loop)."""
        if self.t0 is None or self.done_work == 0:
            return 0.0
        return self.done_work / max(time.perf_counter() - self.t0, 1e-9)

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.work - self.done_work) / r if r > 0 else None

    def step(self, n: int) -> None:
        """n units of work done (called often: only the bar needs more than a sum)."""
        self.done_work += n
        if self.bar:
            self._progress.update(
                self._task, advance=n, rate=f"{self.rate:.1f}", eta=fmt_eta(self.eta_s)
            )

    def skip(self, rows: int, work: int) -> None:
        """A unit another worker took or finished meanwhile: it leaves the totals."""
        self.nrows -= rows
        self.work -= work
        self._progress.update(
            self._task, total=self.work, nrows=self.nrows, eta=fmt_eta(self.eta_s)
        )

    def unit_done(self, rows: int, last: bool) -> None:
        """A unit's rows are computed (its write may still be under way)."""
        self.done_rows += rows
        self._progress.update(self._task, rows=self.done_rows)
        now = time.perf_counter()
        if self.lines and (last or now - self._last_line >= LOG_EVERY_S):
            self._last_line = now
            done = plural(self.nrows, self.row_word).split(" ", 1)[1]
            print(
                f"calibjob: shard {self.shard}: {self.done_rows}/{self.nrows} {done}, "
                f"{self.rate:.1f} {self.label}, ETA {fmt_eta(self.eta_s)}, "
                f"peak memory {peak_memory_gb():.2f} GB",
                file=self.console.file,
                flush=True,
            )
