"""calibjob: resumable, sharded TaQ-DiT calibration-data generation for SD3 on MLX.

Importing the package is light (no MLX, no DiffusionKit): only processes that run a model
import `calibjob.models`.
"""

__version__ = "0.1.0"
