"""calibjob's merged file against the spec's script run as PHASE1.md writes it, array for array.

The yardstick below is the spec's algorithm, plainly: encode each prompt on its own, run every
trajectory alone through DiffusionKit's CFGDenoiser (batch 1, tests/spec_loop.py), stack the
recorded steps step-major ((S, N) so that after selection point j*N+k is selected step j of
trajectory k), keep the `np.linspace` steps, flatten, tile the int32 per-trajectory prompt
indices, and apply `numpy.random.default_rng(seed).permutation(N*K)` to xs, ts and
prompt_indices alike; cfg_scale a float32 scalar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPTS, cli, job_flags, load_npz

N, S, K, SEED, CFG = 6, 6, 3, 7, 1.5
LATENT = (32, 32)


@pytest.fixture(scope="module")
def spec_file() -> dict[str, np.ndarray]:
    """The arrays the spec's script would save for this job (tiny model, CPU float32)."""
    from spec_loop import spec_trajectory

    from calibjob.models import load

    model = load("tiny", shift=3.0)
    pairs = [model.encode([p]) for p in PROMPTS]  # the spec encodes one prompt at a time
    cs = np.concatenate([c for c, _ in pairs])
    cs_pooled = np.concatenate([p for _, p in pairs])
    traj_prompt = np.zeros(N, dtype=np.int32)
    per_traj_xs, per_traj_ts = [], []
    for k in range(N):
        p = k % len(PROMPTS)
        traj_prompt[k] = p
        xs_k, ts_k = spec_trajectory(
            model, cs[p], cs_pooled[p], trajectory=k, seed=SEED, num_steps=S,
            cfg_scale=CFG, latent_size=LATENT,
        )  # fmt: skip
        per_traj_xs.append(xs_k[:, None])  # (S, 1, H, W, C)
        per_traj_ts.append(ts_k)
    xs = np.concatenate(per_traj_xs, axis=1)  # (S, N, H, W, C): step-major
    ts = np.stack(per_traj_ts, axis=1)  # (S, N)
    sel = np.linspace(0, S - 1, K, dtype=int)
    xs, ts = xs[sel], ts[sel]
    xs = xs.reshape(K * N, *xs.shape[2:])
    ts = ts.reshape(K * N)
    prompt_indices = np.tile(traj_prompt, K)
    perm = np.random.default_rng(SEED).permutation(K * N)
    return {
        "xs": xs[perm],
        "ts": ts[perm],
        "prompt_indices": prompt_indices[perm],
        "cs": cs,
        "cs_pooled": cs_pooled,
        "prompts": np.array(PROMPTS),
        "cfg_scale": np.array(CFG, dtype=np.float32),
        "perm": perm,
        "sel": sel,
    }


@pytest.mark.parametrize("batch_size", [1, 2])
def test_merged_file_is_the_spec_scripts_array_for_array(
    spec_file, prompt_file, tmp_path, batch_size
):
    """Bit for bit on CPU float32, at batch 1 (the spec's) and at 2 (calibjob's batching)."""
    store, out = tmp_path / "job.zarr", tmp_path / "cali.npz"
    flags = job_flags(
        prompt_file,
        **{"num-fid-samples": N, "num-sampling-steps": S, "num-selected-steps": K,
           "seed": SEED, "batch-size": batch_size, "cfg-scale": CFG, "shift": 3.0},
    )  # fmt: skip
    cli("run", *flags, "--store", str(store), "--dtype", "float32", "--no-progress")
    cli("merge", str(store), "-o", str(out))
    got = load_npz(out)
    for key in ("xs", "ts", "prompt_indices", "cs", "cs_pooled", "cfg_scale"):
        want = spec_file[key]
        assert got[key].dtype == want.dtype, f"{key}: {got[key].dtype} != {want.dtype}"
        assert got[key].shape == want.shape, key
        assert np.array_equal(got[key], want), f"{key} differs from the spec's"
    assert got["prompts"].tolist() == spec_file["prompts"].tolist()
    assert got["prompt_indices"].dtype == np.int32 and got["cfg_scale"].shape == ()
    # calibjob's extra keys follow the same permutation of the step-major stack
    perm, sel = spec_file["perm"], spec_file["sel"]
    assert np.array_equal(got["trajectory_indices"], perm % N)
    assert np.array_equal(got["step_indices"], sel[perm // N])


def test_point_order_is_step_major_then_permuted():
    """The pure arithmetic, against a literal step-major stack of (trajectory, step) labels."""
    from calibjob.selection import point_order

    n, k, seed = 5, 4, 3
    labels = np.array([[(t, j) for t in range(n)] for j in range(k)])  # (K, N, 2)
    flat = labels.reshape(n * k, 2)[np.random.default_rng(seed).permutation(n * k)]
    traj, step = point_order(n, k, seed)
    assert np.array_equal(traj, flat[:, 0]) and np.array_equal(step, flat[:, 1])


def _synthetic_store(path: Path, prompts: int, tokens: int, dim: int) -> tuple[Path, int]:
    """A complete store of 4 trajectories x 2 steps whose conditioning is large (random data,
    the shapes are what matter); returns it and the bytes of its cs."""
    from calibjob.config import JobConfig
    from calibjob.store import Store

    cfg = JobConfig(
        model_version="tiny", num_fid_samples=4, num_sampling_steps=2, num_selected_steps=2,
        prompts=tuple(f"prompt {i}" for i in range(prompts)), batch_size=1, dtype="float32",
        compile="off",
    )  # fmt: skip
    st = Store.create_or_open(path, cfg)
    rng = np.random.default_rng(0)
    cs = rng.standard_normal((prompts, 2, tokens, dim), dtype=np.float32)
    pooled = rng.standard_normal((prompts, 2, 64), dtype=np.float32)
    st.write_conditioning(cs, pooled, np.array([1.0, 0.5, 0.0], np.float32),
                          np.array([1000.0, 500.0], np.float32))  # fmt: skip
    st.write_trajectories(list(range(4)), rng.standard_normal((4, 2, 32, 32, 16), np.float32))
    return path, cs.nbytes


def test_merge_memory_does_not_grow_with_the_prompts(tmp_path: Path):
    """cs goes into the file prompt by prompt: merge's peak allocation (tracemalloc sees numpy's
    buffers) stays near one prompt's conditioning while the whole cs is 96 MB, and the file's
    cs is the store's."""
    import tracemalloc

    from calibjob.merge import merge
    from calibjob.store import Store

    store, cs_bytes = _synthetic_store(tmp_path / "big.zarr", prompts=48, tokens=256, dim=1024)
    out = tmp_path / "big.npz"
    tracemalloc.start()
    try:
        merge([store], out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cs_bytes == 48 * 2 * 256 * 1024 * 4
    assert peak < cs_bytes / 8, f"merge peaked at {peak / 1e6:.1f} MB for {cs_bytes / 1e6:.0f} MB"
    cs, pooled = Store.open(store, mode="r").conditioning()
    got = load_npz(out)
    assert np.array_equal(got["cs"], cs) and np.array_equal(got["cs_pooled"], pooled)
