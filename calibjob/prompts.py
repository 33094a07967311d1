"""Prompt files: one prompt a line, UTF-8, blank lines and `#` comments skipped."""

from __future__ import annotations

from pathlib import Path

from calibjob.config import resolve_prompt_path
from calibjob.errors import ConfigError


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Read and check a prompt file. Refuses missing, non-UTF-8, empty and duplicated prompts,
    because each would silently skew which conditioning the calibration set covers."""
    p = resolve_prompt_path(str(path))
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt file {path} is not UTF-8 (byte {e.start})") from None
    prompts = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts")
    seen: dict[str, int] = {}
    for i, s in enumerate(prompts):
        if s in seen:
            raise ConfigError(
                f"prompt file {path} repeats a prompt (prompts {seen[s] + 1} and {i + 1}): {s!r}"
            )
        seen[s] = i
    return tuple(prompts)
