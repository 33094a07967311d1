"""A store's model (real loaders, from the hub cache in the environment): calibjob's engine at
batch 1, eager, against the spec's loop on trajectory 0 for 10 steps; prints the largest
difference and ms per trajectory-step of each."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from spec_loop import spec_trajectory  # noqa: E402

from calibjob import models  # noqa: E402
from calibjob.device import mx  # noqa: E402
from calibjob.engine import Engine  # noqa: E402
from calibjob.store import Store  # noqa: E402


def main() -> None:
    st = Store.open(sys.argv[1], mode="r")
    cfg = st.config
    cs, cp = st.conditioning()
    model = models.load(cfg.model_version, shift=cfg.shift, dtype=cfg.dtype, text_encoders=False)
    steps = 10
    eng = Engine(
        model,
        num_steps=steps,
        cfg_scale=cfg.cfg_scale,
        latent_size=tuple(cfg.latent_size),
        seed=cfg.seed,
        compile=False,
        segment=0,
    )
    t0 = time.perf_counter()
    xs, _ = eng.run_unit(0, [0], cs[0], cp[0])
    t_eng = time.perf_counter() - t0
    eng.release_prompt()
    t0 = time.perf_counter()
    ref, _ = spec_trajectory(
        model,
        cs[0],
        cp[0],
        trajectory=0,
        seed=cfg.seed,
        num_steps=steps,
        cfg_scale=cfg.cfg_scale,
        latent_size=tuple(cfg.latent_size),
    )
    t_spec = time.perf_counter() - t0
    d = float(np.abs(xs[0] - ref).max())
    print(
        f"engine vs spec loop, batch 1 eager, {steps} steps: max |diff| {d:.3g} "
        f"(max |x| {float(np.abs(ref).max()):.3g}); finite {bool(np.isfinite(xs).all())}; "
        f"first-run ms/step engine {t_eng / steps * 1e3:.1f}, spec {t_spec / steps * 1e3:.1f}; "
        f"peak {mx.get_peak_memory() / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()
