"""`calibjob preview`: decode finished trajectories of a store into one captioned image grid.

The store keeps x BEFORE each of the S model calls, so its last entry xs[k, S-1] is one Euler
step short of the image. We finish it with that one step, not by rerunning the trajectory (one
model call per image instead of S): DiffusionKit's MMDiT, through calibjob's pieces
(`models/pieces.forward`: the modulation as the engine computes it, guidance term included), on
the batch built the way the engine builds it (`calibjob.data.cfg_batch`), then the engine's
CFG and Euler arithmetic (`euler_step`). The Engine's step itself is private (and being
optimised), so it is not called here; instead tests/test_preview_data.py checks that the result
equals the final latent `Engine.run_unit` returns. Then, as DiffusionKit does: the family's
latent format (`process_out`), the VAE decoder, `clip(x / 2 + 0.5, 0, 1)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibjob.core.store import JobStore
from calibjob.errors import ConfigError

PAD = 8
CAPTION_FONT = 13
MAX_COLUMNS = 4
BATCH = 8  # trajectories per MMDiT call


def choose_trajectories(store: JobStore, spec: str | None, n: int) -> list[int]:
    """`spec` ('0,5,9') if given, else the first n done trajectories; all must be done."""
    done = store.done_mask()
    if spec:
        try:
            ks = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(
                f"--trajectories must be comma-separated integers, got {spec!r}"
            ) from None
        total = store.config.num_fid_samples
        out = [k for k in ks if not 0 <= k < total]
        if out:
            raise ConfigError(f"trajectories {out} are outside 0..{total - 1}")
        todo = [k for k in ks if not done[k]]
        if todo:
            raise ConfigError(f"trajectories {todo} are not done yet; preview needs done ones")
        if not ks:
            raise ConfigError("--trajectories names no trajectory")
        return ks
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    ks = np.flatnonzero(done)[:n].tolist()
    if not ks:
        raise ConfigError(f"{store.path} has no trajectories done yet")
    return ks


def euler_step(model, x, out, sigma: float, sigma_next: float, cfg_scale: float):
    """x_next from MMDiT's output on the batch (under CFG [x, x]): DiffusionKit's CFGDenoiser
    (calculate_denoised, under CFG neg + cfg (pos - neg)) then sample_euler's step, as the
    engine does."""
    import mlx.core as mx

    x = mx.array(x)
    nb = model.info.branches
    sigma_a, next_a = mx.array(np.float32(sigma)), mx.array(np.float32(sigma_next))
    x_in = (mx.concatenate([x] * nb, axis=0) if nb > 1 else x).astype(model.activation_dtype)
    denoised = model.sampler.calculate_denoised(sigma_a, out, x_in)
    if nb > 1:
        pos, neg = denoised.split(2)
        denoised = neg + cfg_scale * (pos - neg)
    d = (x - denoised) / sigma_a
    return x + d * (next_a - sigma_a)


def final_latents(store: JobStore, model, trajectories: list[int]) -> np.ndarray:
    """(B, H, W, 16): each trajectory's xs[k, S-1] taken through the last Euler step.

    All chosen trajectories sit at the same step, so this is one MMDiT call for all of them
    (prompts mixed, see `calibjob.data.cfg_batch`), in batches of BATCH."""
    import mlx.core as mx

    from calibjob.data import cfg_batch
    from calibjob.models.pieces import forward

    cfg = store.config
    sigmas, ts = store.read_prepared("sigmas"), store.read_prepared("ts")
    _, ts_model = model.schedule(cfg.num_sampling_steps)
    if not np.array_equal(ts, ts_model):
        raise ConfigError("the store's timesteps differ from this DiffusionKit's schedule")
    cs, cs_pooled = store.read_prepared("cs"), store.read_prepared("cs_pooled")
    last = cfg.num_sampling_steps - 1
    p = len(cfg.prompts)
    out = []
    for i in range(0, len(trajectories), BATCH):
        ks = trajectories[i : i + BATCH]
        x = np.stack([store.read_row("xs", k)[last] for k in ks])
        batch = cfg_batch(x, np.full(len(ks), ts[last]), cs, cs_pooled, np.array(ks) % p)
        xb, tb, cb, pb = (mx.array(a) for a in batch)
        act = model.activation_dtype
        # the timestep as the store keeps it: in the dtype the model saw (the schedule's)
        y = forward(model.mmdit, xb.astype(act), cb.astype(act), pb.astype(act), tb[:1],
                    cfg.guidance_scale)
        x_next = euler_step(model, x, y, sigmas[last], sigmas[last + 1], cfg.cfg_scale)
        mx.eval(x_next)
        out.append(np.array(x_next, dtype=np.float32))
    return np.concatenate(out)


def decode(model, latents: np.ndarray) -> np.ndarray:
    """Latents (B, H, W, 16) -> RGB uint8 (B, 8H, 8W, 3), DiffusionKit's decode path (the
    family's latent format, then its VAE decoder)."""
    import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)

    # isort: split
    import mlx.core as mx
    x = model.family.process_out(mx.array(latents))
    images = []
    decoder = model.decoder()
    for i in range(x.shape[0]):  # one image at a time: the VAEs are memory-hungry
        img = mx.clip(decoder(x[i : i + 1]) / 2 + 0.5, 0, 1)
        mx.eval(img)
        images.append(np.array(img[0].astype(mx.float32)))
    return (np.stack(images) * 255).round().astype(np.uint8)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (a word longer than the width gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def grid_image(images: np.ndarray, captions: list[str]):
    """A Pillow image: tiles in up to 4 columns, each with its caption wrapped underneath."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    font = ImageFont.load_default(size=CAPTION_FONT)
    wrapped = [_wrap(c, font, w) for c in captions]
    line_h = CAPTION_FONT + 4
    cap_h = max(len(lines) for lines in wrapped) * line_h + PAD
    tile_h = h + cap_h
    grid = Image.new("RGB", (cols * (w + PAD) + PAD, rows * (tile_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        x0 = PAD + (i % cols) * (w + PAD)
        y0 = PAD + (i // cols) * (tile_h + PAD)
        grid.paste(Image.fromarray(img), (x0, y0))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + h + PAD // 2 + j * line_h), line, fill="black", font=font)
    return grid


def preview(store_path: str | Path, out: str | Path, trajectories: str | None = None,
            n: int = 16, force: bool = False) -> tuple[Path, list[int]]:
    """Decode the chosen trajectories of a store into a captioned grid image at `out` (PNG,
    JPEG or WebP, as its suffix says)."""
    from calibjob import models
    from calibjob.outputs import IMAGE_FORMATS, check_output, write_whole

    out = Path(out)
    fmt = check_output(out, force, IMAGE_FORMATS)
    from calibjob.jobs.run import open_run_store

    st = open_run_store(store_path)
    if not st.prepared:
        raise ConfigError(f"{store_path} has no trajectories done yet")
    ks = choose_trajectories(st, trajectories, n)
    cfg = st.config
    model = models.load(cfg.model_version, shift=cfg.shift, dtype=cfg.dtype,
                        local_ckpt=cfg.local_ckpt, text_encoders=False)
    latents = final_latents(st, model, ks)
    images = decode(model, latents)
    p = len(cfg.prompts)
    captions = [f"#{k}: {cfg.prompts[k % p]}" for k in ks]
    grid = grid_image(images, captions).convert("RGB")
    write_whole(out, lambda tmp: grid.save(tmp, format=fmt), force)
    return out, ks


__all__ = ["choose_trajectories", "decode", "euler_step", "final_latents", "grid_image", "preview"]
