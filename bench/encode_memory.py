"""What the encode phase holds above the text encoders, stage by stage (the hub fixture's
full-size CLIP-L, CLIP-G and T5-XXL; a GPU machine, or CPU with --t5-layers to keep it short).

Loads the encoders as `calibjob run` does (DiffusionKit's loaders, weights evaluated), then for
one prompt: each CLIP alone, then T5's embedding and each of its layers, every stage evaluated
by itself, reporting the peak MLX memory above what was resident before the stage and the dtype
it produced. Last, the job's own `encode_one` on the same prompt, whole. Writes a JSON.

    python tests/hub_fixture.py /root/hub --model sd3-medium --corpus prompts/sample_prompts.txt
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=/root/hub python bench/encode_memory.py --json encode.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="argmaxinc/mlx-stable-diffusion-3-medium")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--t5-layers", type=int, default=0, help="stop T5 after N layers (0: all)")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--json", type=Path, default=Path("encode.json"))
    args = ap.parse_args()
    from calibjob.device import mx_dtype
    from calibjob.models.sd3 import load_text_encoders
    from calibjob.models.text import _tokenize

    t0 = time.perf_counter()
    enc = load_text_encoders(args.model, mx_dtype(args.dtype))
    for part in (enc.clip_l, enc.clip_g, enc.t5):
        mx.eval(part.parameters())
    mx.clear_cache()
    resident = mx.get_active_memory() / GB
    res: dict = {"env": common.env_note(), "load_s": time.perf_counter() - t0,
                 "resident_gb": resident, "stages": []}
    print(f"encoders resident: {resident:.2f} GB (load {res['load_s']:.1f} s)", flush=True)

    def stage(name: str, fn):
        mx.reset_peak_memory()
        before = mx.get_active_memory() / GB
        out = fn()
        mx.eval(out)
        row = {"stage": name, "above_gb": mx.get_peak_memory() / GB - before,
               "dtype": str(getattr(out, "dtype", type(out).__name__))}
        res["stages"].append(row)
        print(json.dumps(row), flush=True)
        return out

    for name, clip, tok in (("clip_l", enc.clip_l, enc.tokenizer_l),
                            ("clip_g", enc.clip_g, enc.tokenizer_g)):
        ids = _tokenize(tok, args.prompt)
        out = stage(f"{name} whole", lambda clip=clip, ids=ids: clip(ids).hidden_states[-2])
        res[f"{name}_param_dtypes"] = sorted(
            {str(v.dtype) for _, v in tree_flatten(clip.parameters())}
        )
        del out
    t5 = enc.t5
    ids = _tokenize(enc.t5_tokenizer, args.prompt)
    x = stage("t5 embedding", lambda: t5.wte(ids))
    stack = t5.encoder
    n = x.shape[1]
    bias = stage("t5 position bias", lambda: stack.relative_attention_bias(n, n))
    layers = stack.layers[: args.t5_layers] if args.t5_layers else stack.layers
    stage("t5 layer 0 called whole", lambda: layers[0](x, mask=bias))
    for i, layer in enumerate(layers):  # as the job runs them (calibjob.models.text)
        x = stage(f"t5 layer {i}", lambda layer=layer, x=x, bias=bias: stack.run_layer(
            layer, x, bias))
    x = bias = None
    if not args.t5_layers:
        mx.reset_peak_memory()
        before = mx.get_active_memory() / GB
        t0 = time.perf_counter()
        enc.encode_one(args.prompt)
        res["encode_one_above_gb"] = mx.get_peak_memory() / GB - before
        res["encode_one_s"] = time.perf_counter() - t0
        print(f"encode_one: {res['encode_one_above_gb']:.2f} GB above the encoders, "
              f"{res['encode_one_s']:.1f} s", flush=True)
    worst = max(res["stages"], key=lambda r: r["above_gb"])
    print(f"largest stage: {worst['stage']} {worst['above_gb']:.2f} GB above the encoders; "
          f"CLIP parameter dtypes L {res['clip_l_param_dtypes']} G {res['clip_g_param_dtypes']}")
    args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
