"""The real SD3 path end to end on the hub fixture (GPU machine, no network).

Writes the full-size fixture (python tests/hub_fixture.py) into a local Hugging Face cache,
then with HF_HUB_OFFLINE=1 and HF_HUB_CACHE/HF_HOME pointing there runs the CLI as a user would,
nothing stubbed: `calibjob run --job jobs/paper.toml` (sd3-medium), status, merge, inspect,
preview; optionally the paper job again under `--max-memory 12`; then SD3.5 Large on a short job
and its engine against the spec loop (batch 1). Prints one table and writes e2e.json.

    python bench/hub_e2e.py --cache /root/hub --work /root/e2e [--part medium|large|all]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(args, env, log, timeout=600):
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    log.write(
        f"$ {' '.join(map(str, args))}  [{dt:.1f} s, rc {r.returncode}]\n"
        f"{r.stdout}\n{r.stderr[-4000:]}\n"
    )
    log.flush()
    print(f"{' '.join(map(str, args[2:5]))}: {dt:.1f} s rc {r.returncode}", flush=True)
    if r.returncode:
        print(r.stdout[-1500:], r.stderr[-2500:], flush=True)
    return r, dt


def phases(text: str) -> dict:
    m = re.search(r"phases: (.*)", text)
    out = {}
    for part in m.group(1).split(", ") if m else []:
        name, rest = part.split(" ", 1)
        s, gb = re.findall(r"([\d.]+)", rest)[:2]
        out[name] = (float(s), float(gb))
    return out


def calibjob(*a):
    return [sys.executable, "-m", "calibjob.cli", *map(str, a)]


def run_model(name, model_flag, job_flags, cache, work, env, log, res, extra_run=()):
    store, npz = work / f"{name}.zarr", work / f"{name}.npz"
    r, wall = sh(
        calibjob(
            "run",
            *job_flags,
            "--model-version",
            model_flag,
            "--store",
            store,
            "--no-progress",
            *extra_run,
        ),
        env,
        log,
    )
    res[name] = {
        "run_wall_s": wall,
        "rc": r.returncode,
        "phases": phases(r.stdout + r.stderr),
        "run_out": r.stdout.strip()[-600:],
    }
    st, _ = sh(calibjob("status", store), env, log)
    res[name]["status"] = st.stdout.strip()[-1500:]
    meta = store / "job" / "zarr.json"
    job = json.loads(meta.read_text())["attributes"]["calibjob"] if meta.exists() else {}
    res[name]["batch_size"] = job.get("config", {}).get("batch_size")
    m, merge_s = sh(calibjob("merge", store, "-o", npz, "--force"), env, log)
    res[name]["merge_s"], res[name]["merge_rc"] = merge_s, m.returncode
    i, _ = sh(calibjob("inspect", npz), env, log)
    res[name]["inspect_rc"], res[name]["inspect"] = i.returncode, i.stdout.strip()[-800:]
    return store


def write_fixture(cache: Path, model: str, env: dict, log) -> float:
    """The full-size hub fixture of one model key into `cache`; returns the seconds it took."""
    fixture = [sys.executable, str(ROOT / "tests" / "hub_fixture.py"), cache, "--model", model]
    _, seconds = sh([*fixture, "--corpus", "prompts/sample_prompts.txt"], env, log)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/root/hub"))
    ap.add_argument("--work", type=Path, default=Path("/root/e2e"))
    ap.add_argument("--part", choices=["medium", "maxmem", "large", "all"], default="all")
    ap.add_argument("--json", type=Path, default=Path("e2e.json"))
    ap.add_argument("--large-trajectories", type=int, default=26)
    ap.add_argument("--max-memory", type=float, default=0.0,
                    help="also pass --max-memory GB to the medium run (0: the GPU defaults)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res = json.loads(args.json.read_text()) if args.json.exists() else {}
    log = open(args.json.with_suffix(".log"), "a")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(args.cache),
        "HF_HOME": str(args.work / "hf-home"),
        "PYTHONUNBUFFERED": "1",
    }
    paper = ["--job", "jobs/paper.toml"]
    if args.part in ("medium", "all"):
        fx = write_fixture(args.cache, "sd3-medium", env, log)
        res["fixture_medium_s"] = fx
        cap = ["--max-memory", str(args.max_memory)] if args.max_memory else []
        store = run_model("medium", "sd3-medium", [*paper, *cap], args.cache, args.work, env,
                          log, res)
        p, prev_s = sh(
            calibjob("preview", store, "-o", args.work / "medium.png", "--n", "8"), env, log
        )
        res["medium"]["preview_rc"], res["medium"]["preview_s"] = p.returncode, prev_s
        args.json.write_text(json.dumps(res, indent=1))
    if args.part in ("maxmem", "all"):
        run_model(
            "medium_max12",
            "sd3-medium",
            [*paper, "--max-memory", "12"],
            args.cache,
            args.work,
            env,
            log,
            res,
        )
        args.json.write_text(json.dumps(res, indent=1))
    if args.part in ("large", "all"):
        med = args.cache / "models--argmaxinc--mlx-stable-diffusion-3-medium"
        subprocess.run(["rm", "-rf", str(med)])
        fx = write_fixture(args.cache, "sd3.5-large", env, log)
        res["fixture_large_s"] = fx
        short = [*paper, "--num-fid-samples", str(args.large_trajectories)]
        run_model(
            "large",
            "argmaxinc/mlx-stable-diffusion-3.5-large",
            short,
            args.cache,
            args.work,
            env,
            log,
            res,
        )
        r, _ = sh(
            [sys.executable, str(ROOT / "bench" / "spec_check.py"), str(args.work / "large.zarr")],
            env,
            log,
        )
        res["large_spec_check"] = r.stdout.strip()[-600:]
        args.json.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items()}, indent=1)[-6000:])


if __name__ == "__main__":
    main()
