"""How `calibjob ... --help` is laid out: plain text that fits an 80-column terminal or a pipe.

Typer's default (Rich panels) cuts long option names at 80 columns (`--num-sampling-st…`) and
shows type labels (`<bool>`, `<list[Path]>`, `{store}`). Here: the plain two-column layout,
option names always whole (a long one gets its help on the next line), help text wrapped at
spaces only (never inside `--num-fid-samples` at a hyphen), indented docstring paragraphs (the
examples) kept as written, arguments shown by their metavar alone.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import typer
from typer._click.formatting import HelpFormatter
from typer.core import TyperCommand, TyperGroup


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Paragraphs (blank-line separated) wrapped to `width` at spaces only; a paragraph whose
    first line is indented (an example) is kept line for line."""
    out: list[str] = []
    for para in re.split(r"\n(?:[ \t]*\n)+", text.strip("\n")):
        lines = [ln.rstrip() for ln in para.splitlines() if ln.strip() not in ("", "\b")]
        if not lines:
            continue
        if out:
            out.append("")
        if lines[0][:1].isspace():
            out += [indent + ln for ln in lines]
            continue
        out += textwrap.wrap(
            " ".join(ln.strip() for ln in lines),
            max(width - len(indent), 20),
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )
    return out


class Formatter(HelpFormatter):
    """click's help formatter, wrapping with `wrap` (spaces only, examples kept)."""

    def write_text(self, text: str) -> None:
        self.write("\n".join(wrap(text, self.width, " " * self.current_indent)) + "\n")

    def write_dl(
        self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2
    ) -> None:
        rows = list(rows)
        if not rows:
            return
        first = min(max(len(name) for name, _ in rows), col_max) + col_spacing
        left = " " * (self.current_indent + first)
        for name, help_ in rows:
            self.write(" " * self.current_indent + name)
            if not help_:
                self.write("\n")
                continue
            if len(name) <= first - col_spacing:
                self.write(" " * (first - len(name)))
            else:
                self.write("\n" + left)  # a long option name stays whole, help goes below
            lines = wrap(help_, self.width - self.current_indent - first) or [""]
            self.write(lines[0].strip() + "\n")
            for ln in lines[1:]:
                self.write((left + ln if ln else "") + "\n")


class Context(typer.Context):
    formatter_class = Formatter


# the commands in the order a job goes, each with a line that fits 80 columns whole (click
# would cut the docstring's first sentence with "...")
COMMANDS = {
    "run": "Generate a job's trajectories (or one shard's) into a store.",
    "resume": "Continue a store's job (run or profile) from its own spec.",
    "launch": "Run a job's shards as local processes or a Slurm array.",
    "status": "Done/total per shard, states, throughput, ETA and damage.",
    "merge": "Select steps, shuffle, write the paper-format .npz.",
    "inspect": "Validate a calibration file; x_t statistics per step.",
    "preview": "Decode done trajectories into a captioned image grid.",
    "profile": "Activation statistics of the MMDiT over a calibration set.",
    "profile-report": "Figures, per-layer table and export of a profile.",
}


class Group(TyperGroup):
    context_class = Context

    def list_commands(self, ctx: typer.Context) -> list[str]:
        have = super().list_commands(ctx)
        return [c for c in COMMANDS if c in have] + [c for c in have if c not in COMMANDS]

    def get_command(self, ctx: typer.Context, name: str):
        cmd = super().get_command(ctx, name)
        if cmd is not None and name in COMMANDS:
            cmd.short_help = COMMANDS[name]
        return cmd


class Command(TyperCommand):
    """A command whose usage line and argument list name arguments by their metavar (`STORE...`,
    not `{stores}...` and `<list[Path]>`). `extra_sections` adds option lists from elsewhere."""

    context_class = Context

    def _arg_name(self, p) -> str:
        return (p.metavar or (p.name or "").upper()) + ("..." if p.nargs != 1 else "")

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [
            self._arg_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"
        ]

    def format_options(self, ctx: typer.Context, formatter: HelpFormatter) -> None:
        args, opts = [], []
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec is None:
                continue
            if p.param_type_name == "argument":
                args.append((self._arg_name(p), rec[1]))
            else:
                opts.append(rec)
        for title, rows in [("Arguments", args), ("Options", opts), *self.extra_sections(ctx)]:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def extra_sections(self, ctx: typer.Context) -> list[tuple[str, list[tuple[str, str]]]]:
        return []


def option_rows(
    params, ctx: typer.Context, skip: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """The help rows of another command's options (for a command that takes them through)."""
    keep = [p for p in params if p.param_type_name == "option" and p.name not in skip]
    return [r for r in (p.get_help_record(ctx) for p in keep) if r]
