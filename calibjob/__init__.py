"""calibjob: resumable, sharded TaQ-DiT calibration-data generation for SD3 and FLUX.1 on MLX.

Importing the package is light (no MLX, no DiffusionKit): only processes that run a model
import `calibjob.models`.
"""

__version__ = "0.1.0"

# time.perf_counter() when the console entry (calibjob/__main__.py) began: `run` counts its
# start-up (the imports) as a phase of its wall time from here. None in other processes.
process_start: float | None = None
