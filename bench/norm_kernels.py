"""The fused step's token passes alone (issue 22), on CUDA: `cuda_ops`' modulated norms at
several layouts of threads and rows (6 chunks a thread and 8 rows a block being session 9's
shape: one warp a row), the post-MLP residual as MLX's op beside `cuda_ops.gated_residual`, and
the q/k/v join batch-major beside token-major. For each: us a call, the rate over the bytes it
must move, and how many outputs differ in any bit from session 9's shape or from MLX's op.

    python bench/norm_kernels.py [--json PATH]

SD3-2b's shapes (26 rows: 13 trajectories with CFG; 256 image and 589 text tokens; width 1536,
float16). Measured on an H200 (2026-12-03), us a call, image / text stream: the plain norm 49 /
79 in session 9's kernel (commit f40463c), 29 / 45 at 3 chunks a thread and one row a block
(cuda_ops' layout; 27-39 / 45-58 over all layouts); the gated norm 47 / 85, then 36 / 64
(35-47 / 64-83); the residual 27 / 47 as MLX's compiled op, 28 / 48 as the kernel (which rounds
the product as the eager ops do; MLX's compiled op differs from them in 5.6% of outputs); the
join 120 us batch-major, 112 token-major. The layouts differ from session 9's shape in under
0.01% of outputs (the order of the float32 sums). Timed this way each call carries its launch;
Nsight Compute times the kernels alone (README, "Where the step's time goes").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from cuda_ops_check import not_equal  # noqa: E402

from calibjob.models import cuda_ops  # noqa: E402

# (chunks of 8 a thread, rows a block) of cuda_ops' norm kernels, timed alone; 6 and 8 at
# SD3's width is one warp a row, 8 rows a block: session 9's shape, whose outputs equal session
# 9's kernel (commit f40463c) to the bit (measured on the H200: 0 outputs differ)
SESSION9 = (6, 8)
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (3, 1), (3, 2), (3, 4), (6, 4), (6, 8)]


def new_norm(kind: str, x, mods, y=None, layout: tuple | None = None, eps: float = 1e-6,
             by_token: bool = False) -> list:  # fmt: skip
    """cuda_ops' kernel `kind` (norm or gated) at `layout` (CH, R), on SD3's chunks (shift 0/3,
    scale 1/4, gate 2 of 6)."""
    lay = None if layout is None else {"CH": layout[0], "R": layout[1]}
    if kind == "gated":
        chunks = {"SHIFT": 3, "SCALE": 4, "GATE": 2, "YBT": int(by_token)}
        return cuda_ops._norm("gated", [x, y, mods], x, mods, chunks, eps, lay)
    return cuda_ops._norm("norm", [x, mods], x, mods, {"SHIFT": 0, "SCALE": 1}, eps, lay)


def join(first: tuple, second: tuple, by_token: bool) -> list:
    """cuda_ops' join kernel, token-major or batch-major."""
    a = first[0]
    b, l1, l2, c = a.shape[0], a.shape[1], second[0].shape[1], a.shape[-1]
    shape = (l1 + l2, b, 1, c) if by_token else (b, l1 + l2, 1, c)
    n = b * (l1 + l2) * c // 8
    return cuda_ops._kernel("join")(
        inputs=[first[0], second[0], first[1], second[1], first[2], second[2]],
        template=[("T", a.dtype), ("C", c), ("BT", int(by_token))],
        grid=((n + 255) // 256 * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[shape] * 3, output_dtypes=[a.dtype] * 3,
    )  # fmt: skip


def _entry(passes: int, nbytes: int, ms: float, **more) -> dict:
    return {"us": ms * 1e3, "TB/s": passes * nbytes / (ms * 1e-3) / 1e12, **more}


def passes_at(x: mx.array, y: mx.array, mods: mx.array, timed) -> dict:
    """Every form of the norms and the residual on tokens x (with y, mods), timed."""
    d, nb, r = x.shape[-1], x.nbytes, {}
    for kind, passes in (("norm", 2), ("gated", 4)):
        yy = y if kind == "gated" else None
        ref = new_norm(kind, x, mods, yy, SESSION9)
        for lay in LAYOUTS:
            out = new_norm(kind, x, mods, yy, lay)
            ms = timed(lambda: new_norm(kind, x, mods, yy, lay)[-1])  # noqa: B023
            diff = sum(not_equal(a, b) for a, b in zip(out, ref, strict=True))
            r[f"{kind} CH{lay[0]} R{lay[1]}"] = _entry(passes, nb, ms, **{"not equal": diff})
    yt = mx.contiguous(y.transpose(1, 0, 2, 3)).reshape(-1, d)  # token-major, as o_proj's
    mx.eval(yt)
    out = new_norm("gated", x, mods, yt, by_token=True)
    ms = timed(lambda: new_norm("gated", x, mods, yt, by_token=True)[-1])
    diff = sum(not_equal(a, b) for a, b in zip(out, ref, strict=True))
    r["gated, y token-major, cuda_ops' layout"] = _entry(4, nb, ms, **{"not equal": diff})
    g = mods[..., 5 * d : 6 * d]
    mlx_res = mx.compile(lambda x, y, g: x + y * g)
    ref = mlx_res(x, y, g)
    r["residual, MLX compiled"] = _entry(3, nb, timed(lambda: mlx_res(x, y, g)))
    for ch in (1, 2, 4):
        cuda_ops.RESIDUAL_CHUNKS = ch
        out = cuda_ops.gated_residual(x, y, mods, 6, 5)
        ms = timed(lambda: cuda_ops.gated_residual(x, y, mods, 6, 5))
        r[f"residual kernel CH{ch}"] = _entry(3, nb, ms, **{"not equal": not_equal(out, ref)})
    cuda_ops.RESIDUAL_CHUNKS = 2
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    res: dict = {"env": common.env_note()}
    dt, d, rows = mx.float16, 1536, 26
    mx.random.seed(1)
    mods = (mx.random.normal((rows, 1, 1, 6 * d)) * 0.2).astype(dt)

    def timed(fn) -> float:
        return common.mlx_ms(fn, reps=args.reps)

    for tokens in (256, 589):
        x = (mx.random.normal((rows, tokens, 1, d)) * 3 + 1).astype(dt)
        y = mx.random.normal((rows, tokens, 1, d)).astype(dt)
        mx.eval(x, y, mods)
        r = res[f"{tokens} tokens"] = passes_at(x, y, mods, timed)
        print(f"--- {rows} x {tokens} x {d}", flush=True)
        for k, v in r.items():
            print(f"  {k:<38}" + "  ".join(f"{kk} {vv:.3g}" for kk, vv in v.items()), flush=True)
    a = [mx.random.normal((rows, n, 1, d)).astype(dt) for n in (256, 589) for _ in "qkv"]
    mx.eval(a)
    nb = 2 * sum(t.nbytes for t in a)
    j: dict = {}
    for by_token in (False, True):
        ms = timed(lambda bt=by_token: join(tuple(a[:3]), tuple(a[3:]), bt)[0])
        j["token-major" if by_token else "batch-major"] = _entry(1, nb, ms)
    res["join"] = j
    print("--- join", json.dumps(j), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
