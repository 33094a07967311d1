"""GPU memory of the Euler step: what a trajectory costs, and which step variant bounds it.

SD3-2b-shaped MMDiT with random weights (float16), 589 text tokens, 256x256, CFG 1.5. For each
step variant (segment = blocks per segment of the segmented step; 0 = one graph per step), eager
and compiled, and each batch: one warm-up unit of 10 steps, then one measured unit: peak MLX
memory (mx.get_peak_memory after a reset) and ms per trajectory-step. Also the profile of what
holds memory: the weights, one joint block's peak at batch 13 evaluated alone, and the whole
step. Writes memory.json (with the chosen variant: the least memory within 5% of the whole
step's compiled speed at batch 13).

    python bench/memory.py [--json PATH] [--batches 1,4,13,26] [--segments 0,1,2,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,13,26")
    ap.add_argument("--segments", default="0,1,2,4")
    ap.add_argument("--small", action="store_true", help="small model (CPU logic check)")
    ap.add_argument("--json", type=Path, default=Path("memory.json"))
    args = ap.parse_args()
    from calibjob.engine import Engine

    if args.small:
        dt, dname = mx.float32, "float32"
        config = common.mmdit_config(
            depth=2, hidden=128, heads=2, text_dim=256, pooled_dim=128, dtype=dt
        )
        tokens, text_dim, pooled = 77, 256, 128
    else:
        dt, dname = mx.float16, "float16"
        config = common.sd3_2b_config(dt)
        tokens, text_dim, pooled = 589, 4096, 2048
    mmdit = common.random_mmdit(config, dt)
    model = common.make_model(mmdit, dname)
    cfg = common.job_config(dtype=dname)
    cs, cp = common.random_conditioning(len(cfg.prompts), tokens, text_dim, pooled)
    mx.eval(mmdit.parameters())
    weights = mx.get_active_memory() / 1e9
    res = {"weights_gb": weights, "env": common.env_note(), "rows": []}
    try:
        res["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception as e:  # noqa: BLE001
        res["device_info"] = str(e)
    print(f"weights {weights:.2f} GB; device_info {res['device_info']}", flush=True)

    # profile: one joint block alone at batch 13 (2B = 26 rows), evaluated by itself
    from calibjob.models.pieces import modulated_modules, modulation_params

    b = 13
    mods = modulation_params(mmdit, mx.array(cp[0]).astype(dt), mx.array([1000.0], dtype=dt))[0]
    mods_b = [mx.repeat(m, b, axis=0) for m in mods]
    mx.eval(mods_b)
    for m, v in zip(modulated_modules(mmdit), mods_b, strict=True):
        m._modulation_params = {1000.0: v}
    h = mx.random.normal((2 * b, 256, 1, config.hidden_size)).astype(dt)
    c = mx.random.normal((2 * b, tokens, 1, config.hidden_size)).astype(dt)
    t = mx.array([1000.0], dtype=dt)
    mx.eval(h, c, t)
    blk = mmdit.multimodal_transformer_blocks[0]
    for _ in range(2):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = blk(h, c, t)
        mx.eval(out)
        res["one_block_b13_gb"] = (mx.get_peak_memory() - base) / 1e9
        del out
    for m in modulated_modules(mmdit):
        del m._modulation_params
    print(
        f"one joint block alone, batch 13: {res['one_block_b13_gb']:.2f} GB above its inputs",
        flush=True,
    )

    batches = [int(x) for x in args.batches.split(",")]
    for seg in [int(x) for x in args.segments.split(",")]:
        for compile in (False, True):
            bs = (
                batches
                if seg in (0, max(int(x) for x in args.segments.split(","))) or b in batches
                else batches
            )
            for batch in bs:
                eng = Engine(
                    model,
                    num_steps=10,
                    cfg_scale=cfg.cfg_scale,
                    latent_size=tuple(cfg.latent_size),
                    seed=0,
                    compile=compile,
                    segment=seg,
                )
                trajs = [len(cfg.prompts) * j for j in range(batch)]
                eng.run_unit(0, trajs, cs[0], cp[0])
                mx.clear_cache()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                eng.run_unit(0, trajs, cs[0], cp[0])
                dt_s = time.perf_counter() - t0
                peak = mx.get_peak_memory() / 1e9
                eng.release_prompt()
                del eng
                mx.clear_cache()
                row = {
                    "segment": seg,
                    "compile": compile,
                    "batch": batch,
                    "peak_gb": peak,
                    "per_traj_gb": (peak - weights) / batch,
                    "ms_per_traj_step": dt_s / (batch * 10) * 1e3,
                }
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                args.json.write_text(json.dumps(res, indent=1))
    # choose: least per-trajectory memory at batch 13 compiled within 5% of segment 0's speed
    r13 = [r for r in res["rows"] if r["batch"] == 13 and r["compile"]]
    if r13:
        ref = next(r for r in r13 if r["segment"] == 0)["ms_per_traj_step"]
        ok = [r for r in r13 if r["ms_per_traj_step"] <= ref * 1.05] or r13
        best = min(ok, key=lambda r: r["per_traj_gb"])
        res["chosen_segment"] = best["segment"]

        def per(seg, comp):
            rows = [
                r
                for r in res["rows"]
                if r["segment"] == seg and r["compile"] == comp and r["batch"] > 1
            ]
            return max(r["per_traj_gb"] for r in rows) if rows else 1.0

        res["per_traj_gb"] = {"off": per(best["segment"], False), "on": per(best["segment"], True)}
        print(f"chosen segment {best['segment']}: per trajectory {res['per_traj_gb']}", flush=True)
    args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
