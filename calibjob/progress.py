"""A worker's progress: one definition of throughput, shown as a bar on a terminal and as plain
log lines elsewhere (nohup, Slurm, `> run.log 2>&1`).

Throughput is denoising throughput everywhere (the bar, the log lines, `run`'s summary, the
store's progress record that `status` reads): trajectory-steps computed per second of the unit
loop, from its first unit on, so model load and prompt encoding never count.
"""

from __future__ import annotations

import resource
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_EVERY_S = 30.0
THROUGHPUT = "traj-steps/s"  # trajectory-steps per second of denoising: the one label


def plural(n: int, word: str) -> str:
    """'1 unit', '2 units', '1 trajectory', '3 trajectories'."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def peak_memory_gb() -> float:
    """The most memory MLX has held in this process since its last reset (GB): on a Mac the
    machine's own memory, shared with the GPU. Without MLX loaded, the peak resident set."""
    try:
        import mlx.core as mx

        return mx.get_peak_memory() / 1e9
    except Exception:  # noqa: BLE001  (no MLX loaded, or an old one)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, B on macOS
        return rss / (1e9 if sys.platform == "darwin" else 1e6)


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def announce_start(
    shard: str, trajectories: int, units: int, model: str, mode: bool | None, console: Console
) -> None:
    """`run`'s first line, before DiffusionKit imports and the model loads (seconds on a CPU, a
    minute or more for SD3's weights): the worker says at once what it took on. Silent under
    --no-progress, like the progress lines it precedes (and starting as they do)."""
    if mode is False:
        return
    print(
        f"calibjob: shard {shard}: {plural(trajectories, 'trajectory')} in "
        f"{plural(units, 'unit')} to compute; loading {model}",
        file=console.file,
        flush=True,
    )


class ShardProgress:
    """Counts a shard's denoising steps and shows them (bar, log lines, or nothing)."""

    def __init__(
        self,
        shard: str,
        trajectories: int,
        steps_per_trajectory: int,
        mode: bool | None,
        console: Console,
    ):
        self.shard, self.ntraj, self.steps = shard, trajectories, steps_per_trajectory
        self.console = console
        tty = console.file.isatty() if hasattr(console.file, "isatty") else False
        # None: a bar on a terminal, log lines otherwise; --progress forces the bar,
        # --no-progress silences both
        self.bar = (mode is None and tty) or mode is True
        self.lines = mode is None and not tty
        self.done_steps = 0
        self.done_traj = 0
        self.t0: float | None = None
        self._last_line = -1e9
        self._progress = Progress(
            TextColumn("[bold]shard {task.fields[shard]}"),
            BarColumn(),
            TextColumn("{task.fields[traj]}/{task.fields[ntraj]} trajectories"),
            MofNCompleteColumn(),
            TextColumn("steps, {task.fields[rate]} " + THROUGHPUT + ", ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.bar,
        )
        self._task = None

    def __enter__(self) -> ShardProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task(
            "run", total=self.ntraj * self.steps, shard=self.shard, traj=0, ntraj=self.ntraj,
            rate="-", eta="-",
        )  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self) -> None:
        """The unit loop begins: throughput counts from here."""
        self.t0 = time.perf_counter()

    @property
    def rate(self) -> float:
        """Denoising throughput so far (trajectory-steps per second)."""
        if self.t0 is None or self.done_steps == 0:
            return 0.0
        return self.done_steps / max(time.perf_counter() - self.t0, 1e-9)

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.ntraj * self.steps - self.done_steps) / r if r > 0 else None

    def step(self, n: int) -> None:
        """n trajectory-steps computed (called once per Euler step: only the bar needs more)."""
        self.done_steps += n
        if self.bar:
            self._progress.update(
                self._task, advance=n, rate=f"{self.rate:.1f}", eta=fmt_eta(self.eta_s)
            )

    def skip(self, trajectories: int) -> None:
        """A unit another worker took or finished meanwhile: it leaves the totals."""
        self.ntraj -= trajectories
        self._progress.update(
            self._task, total=self.ntraj * self.steps, ntraj=self.ntraj, eta=fmt_eta(self.eta_s)
        )

    def unit_done(self, trajectories: int, last: bool) -> None:
        """A unit's trajectories are computed (its write may still be under way)."""
        self.done_traj += trajectories
        self._progress.update(self._task, traj=self.done_traj)
        now = time.perf_counter()
        if self.lines and (last or now - self._last_line >= LOG_EVERY_S):
            self._last_line = now
            print(
                f"calibjob: shard {self.shard}: {self.done_traj}/{self.ntraj} trajectories, "
                f"{self.rate:.1f} {THROUGHPUT}, ETA {fmt_eta(self.eta_s)}, "
                f"peak memory {peak_memory_gb():.2f} GB",
                file=self.console.file,
                flush=True,
            )
