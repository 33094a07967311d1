"""Phase 2: time-aware activation profiles of the MMDiT over a calibration set.

`calibjob profile CALIB.npz --store PROFILE.zarr` records, per (layer, input, timestep), the
statistics of every linear layer's input (a sharded, resumable job like `run`);
`calibjob profile-report` plots and exports them; `load` hands them to phase-3 code:

    from calibjob.profile import load
    prof = load("profile.zarr")
    prof["mm_00_img", "fc2_in"].max      # (timesteps, channels)

Importing this package does not import MLX (only the worker's model code does).
"""

from calibjob.profile.stats import Profile, TapStats, load

__all__ = ["Profile", "TapStats", "load"]
