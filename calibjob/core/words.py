"""How counts, ranges and durations are said to the user: one wording for every command."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """'1 unit', '2 units', '1 trajectory', '3 trajectories'."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def fmt_ranges(ks) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (for messages about many rows or units)."""
    ks = sorted(int(k) for k in ks)
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ", ".join(out)


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def fmt_ago(seconds: float | None) -> str:
    """'12 s ago', '41 min ago', '3.2 h ago'."""
    return "-" if seconds is None else f"{fmt_eta(max(seconds, 0.0))} ago"
