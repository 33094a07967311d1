"""Step selection, shuffling and initial noise: the pure numpy arithmetic of the job."""

from __future__ import annotations

import numpy as np

STEP_SELECTIONS = ("linspace", "stride")


def select_steps(num_steps: int, num_selected: int, method: str = "linspace") -> np.ndarray:
    """Indices of the recorded steps that go into the calibration set.

    linspace: `np.linspace(0, S-1, K, dtype=int)`, the spec's uniform selection (first and last
    step included). stride: `range(0, S, S // K)`, as TaQ-DiT's own code does (last step left out).
    """
    if not 1 <= num_selected <= num_steps:
        raise ValueError(f"cannot select {num_selected} of {num_steps} steps")
    if method == "linspace":
        return np.linspace(0, num_steps - 1, num_selected, dtype=int)
    if method == "stride":
        return np.arange(0, num_steps, num_steps // num_selected)[:num_selected]
    raise ValueError(
        f"unknown step selection {method!r} (choose from {', '.join(STEP_SELECTIONS)})"
    )


def shuffle_order(num_points: int, seed: int) -> np.ndarray:
    """The merge's permutation of the calibration points, from the job seed alone."""
    return np.random.default_rng(seed).permutation(num_points)


def point_order(
    num_trajectories: int, num_selected: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each point of the merged file comes from: (trajectory, selected-step position).

    The spec's order: stack the selected steps step-major (point `j * N + k` is selected step j
    of trajectory k), then apply `shuffle_order(N * K, seed)`. Both arrays are int64, length N*K.
    """
    perm = shuffle_order(num_trajectories * num_selected, seed).astype(np.int64)
    return perm % num_trajectories, perm // num_trajectories


def initial_noise(
    seed: int, trajectory: int, latent_size: tuple[int, int], channels: int
) -> np.ndarray:
    """Trajectory k's starting noise, (H, W, C) float32.

    DiffusionKit's convention (`np.random.seed(seed + k)`, `randn` in NCHW, transposed to NHWC),
    so trajectory k is the image DiffusionKit's own CLI makes for seed + k. It depends on the seed
    and k only, never on which batch or shard computes k.
    """
    h, w = latent_size
    rs = np.random.RandomState(seed + trajectory)
    return rs.randn(1, channels, h, w).transpose(0, 2, 3, 1)[0].astype(np.float32)
