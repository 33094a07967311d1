"""A `--local-ckpt` checked from its safetensors header alone, before anything loads: minutes of
loading text encoders should not come before "this file is not a checkpoint".

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor,
then the data. SD3's MMDiT checkpoints keep the original layout: `model.diffusion_model.*`, with
`joint_blocks.{i}` for each of the `depth` joint blocks (24 in SD3 Medium, 38 in SD3.5 Large).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from calibjob.errors import ConfigError

MMDIT_PREFIX = "model.diffusion_model."
MAX_HEADER = 100 << 20  # a real header is a few MB; more is a file that is not safetensors
DEPTHS = {24: "SD3 Medium", 38: "SD3.5 Large"}


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names in a safetensors file's header; one line for anything else."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--local-ckpt {path}: no such file")
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if not 2 <= n <= min(MAX_HEADER, p.stat().st_size - 8):
                raise ValueError("its first 8 bytes are no safetensors header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except OSError as e:
        raise ConfigError(f"--local-ckpt {path}: cannot read it ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ConfigError(f"--local-ckpt {path}: not a safetensors file ({why})") from None
    return [k for k in header if k != "__metadata__"]


def mmdit_depth(names: list[str]) -> int:
    """Joint blocks in an MMDiT checkpoint (0: none, so no MMDiT)."""
    blocks = {int(m.group(1)) for k in names if (m := re.search(r"joint_blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def looks_like(names: list[str]) -> str:
    """What a checkpoint looks like, for messages: 'a depth-38 MMDiT (SD3.5 Large)'."""
    depth = mmdit_depth(names)
    if not depth:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"no MMDiT: its {len(names)} tensors are {shown}"
    known = f" ({DEPTHS[depth]})" if depth in DEPTHS else ""
    return f"a depth-{depth} MMDiT{known}"


def check_local_ckpt(path: str | None) -> None:
    """A --local-ckpt that is missing, unreadable, not safetensors, or no SD3 MMDiT is named
    in one line now (DiffusionKit would report it after the text encoders, as a hub error)."""
    if path is None:
        return
    names = tensor_names(path)
    if not any(k.startswith(MMDIT_PREFIX + "joint_blocks.") for k in names):
        raise ConfigError(
            f"--local-ckpt {path}: not an SD3 MMDiT checkpoint ({looks_like(names)}); it must "
            f"hold the MMDiT in SD3's layout ({MMDIT_PREFIX}joint_blocks.*)"
        )


def mismatch(path: str, model: str, error: str) -> str:
    """One line for a checkpoint whose tensors do not fit the model (MLX's error lists every
    name, one a line: tens of thousands of characters)."""
    m = re.search(r"(Received|Missing) (\d+) parameters[^:]*:\s*(.*)", error, re.S)
    if m:
        names = [x.strip().rstrip(".") for x in m.group(3).split(",") if x.strip()]
        kind = "unexpected" if m.group(1) == "Received" else "of the model's missing"
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        what = f"{m.group(2)} tensors {kind} ({shown})"
    else:
        what = " ".join(error.split())[:160]
    return (
        f"--local-ckpt {path} does not fit {model}: it looks like "
        f"{looks_like(tensor_names(path))}; {what}"
    )
