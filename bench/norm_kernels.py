"""The fused step's token passes alone (issue 22), on CUDA: the modulated norms in session 9's
form (one warp a row, 8 rows a block) beside `cuda_ops`' blocks of rows at several layouts, the
post-MLP residual as MLX's op beside `cuda_ops.gated_residual`, and the q/k/v join batch-major
beside token-major. For each: us a call, the rate over the bytes it must move, and how many
outputs differ in any bit from the form it replaces.

    python bench/norm_kernels.py [--json PATH]

SD3-2b's shapes (26 rows: 13 trajectories with CFG; 256 image and 589 text tokens; width 1536,
float16). Measured on an H200 (2026-12-03), us a call, image / text stream: the plain norm 49 /
79 in session 9's form, 29 / 45 at 3 chunks a thread and one row a block (cuda_ops' layout;
27-39 / 45-58 over all layouts); the gated norm 47 / 85, then 36 / 64 (35-47 / 64-83); the
residual 27 / 47 as MLX's compiled op, 28 / 48 as the kernel (which rounds the product as the
eager ops do; MLX's compiled op differs from them in 5.6% of outputs); the join 120 us
batch-major, 112 token-major. The new norms differ from session 9's in under 0.01% of outputs (the
order of the float32 sums). Timed this way each call carries its launch; Nsight Compute times
the kernels alone (README, "Where the step's time goes").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from cuda_ops_check import not_equal  # noqa: E402

from calibjob.models import cuda_ops  # noqa: E402

# session 9's norm kernels: one warp per token row, 8 rows a block of 256 threads
_OLD_NORM = """
  constexpr int PER = (D / 8 + 31) / 32;
  const int L = x_shape[1];
  const int N = x_shape[0] * L;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= N) return;
  const size_t base = (size_t)row * D;
  const T* mrow = mods + (size_t)(row / L) * K * D;
  float v[PER * 8];
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    const int c = (p * 32 + lane) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[p * 8 + j] = 0.f;
    if (c < D) {
      LOAD
    }
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < PER * 8; ++i) s += v[i];
  const float mean = calib::warp_sum(s) / D;
  float q = 0.f;
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    if ((p * 32 + lane) * 8 < D) {
#pragma unroll
      for (int j = 0; j < 8; ++j) q += (v[p * 8 + j] - mean) * (v[p * 8 + j] - mean);
    }
  }
  const float rstd = rsqrtf(calib::warp_sum(q) / D + EPS);
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    const int c = (p * 32 + lane) * 8;
    if (c < D) {
      float sc[8], sh[8];
      calib::load8(mrow + SCALE * D + c, sc);
      calib::load8(mrow + SHIFT * D + c, sh);
      alignas(16) T o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        T n = static_cast<T>((v[p * 8 + j] - mean) * rstd);
        T g = static_cast<T>(1.f + sc[j]);
        T m = static_cast<T>(static_cast<float>(n) * static_cast<float>(g));
        o[j] = static_cast<T>(static_cast<float>(m) + sh[j]);
      }
      calib::store8(out + base + c, o);
    }
  }
"""
_OLD_LOAD_GATED = """
      float xv[8], yv[8], gv[8];
      calib::load8(x + base + c, xv);
      calib::load8(y + base + c, yv);
      calib::load8(mrow + GATE * D + c, gv);
      alignas(16) T r[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        T t = static_cast<T>(yv[j] * gv[j]);
        r[j] = static_cast<T>(xv[j] + static_cast<float>(t));
        v[p * 8 + j] = static_cast<float>(r[j]);
      }
      calib::store8(res + base + c, r);
"""
_old: dict = {}

# (chunks of 8 a thread, rows a block) of cuda_ops' norm kernels, timed alone
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (3, 1), (3, 2), (3, 4), (6, 4), (6, 8)]


def old_norm(kind: str, x: mx.array, mods: mx.array, y: mx.array | None = None,
             eps: float = 1e-6) -> list:  # fmt: skip
    """Session 9's kernel `kind` (norm or gated) on SD3's chunks (shift 0/3, scale 1/4, gate
    2 of 6)."""
    if kind not in _old:
        body = _OLD_NORM.replace("LOAD", _OLD_LOAD_GATED if kind == "gated" else
                                 "calib::load8(x + base + c, v + p * 8);")  # fmt: skip
        body = body.replace("EPS", f"{eps!r}f")
        tag = hashlib.sha1(body.encode()).hexdigest()[:10]
        _old[kind] = mx.fast.cuda_kernel(
            name=f"calib_old_{kind}_{tag}", header=cuda_ops._HEADER, source=body,
            input_names=["x", "y", "mods"] if kind == "gated" else ["x", "mods"],
            output_names=["res", "out"] if kind == "gated" else ["out"],
        )  # fmt: skip
    d, n = x.shape[-1], x.shape[0] * x.shape[1]
    chunks = {"SHIFT": 3, "SCALE": 4, "GATE": 2} if kind == "gated" else {"SHIFT": 0, "SCALE": 1}
    return _old[kind](
        inputs=[x, y, mods] if kind == "gated" else [x, mods],
        template=[("T", x.dtype), ("D", d), ("K", mods.shape[-1] // d), *chunks.items()],
        grid=((n + 7) // 8 * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[x.shape] * (2 if kind == "gated" else 1),
        output_dtypes=[x.dtype] * (2 if kind == "gated" else 1),
    )  # fmt: skip


def new_norm(kind: str, x, mods, y=None, layout: tuple | None = None, eps: float = 1e-6,
             by_token: bool = False) -> list:  # fmt: skip
    """cuda_ops' kernel `kind` at `layout` (CH, R), the same chunks as `old_norm`."""
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
        ref = old_norm(kind, x, mods, yy)
        ms = timed(lambda: old_norm(kind, x, mods, yy)[-1])  # noqa: B023 (called here)
        r[f"{kind} session 9"] = _entry(passes, nb, ms)
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
    r["gated, y token-major, default layout"] = _entry(4, nb, ms, **{"not equal": diff})
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
