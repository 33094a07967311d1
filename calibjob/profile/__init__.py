"""Phase 2: time-aware activation profiles of the MMDiT over a calibration set.

`calibjob profile CALIB.npz --store PROFILE.zarr` records, per (layer, input, timestep), the
statistics of every linear layer's input (a sharded, resumable job like `run`);
`calibjob profile-report` plots and exports them; `load` hands them to phase-3 code:

    from calibjob.profile import load
    prof = load("profile.zarr")
    prof["mm_00_img", "fc2_in"].max      # (timesteps, channels)

Importing this package does not import MLX (only the worker's model code does).
"""

from __future__ import annotations

__all__ = ["Profile", "TapStats", "load"]


def __getattr__(name: str):
    """`load`, `Profile`, `TapStats` on first use: the CLI imports this package for its
    commands, and `calibjob --help` should not pay for Zarr."""
    if name in __all__:
        import calibjob.profile.stats as stats

        return getattr(stats, name)
    raise AttributeError(f"module 'calibjob.profile' has no attribute {name!r}")
