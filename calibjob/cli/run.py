"""`calibjob run`: one worker of a job (or one shard of it) into a store. Its job flags are
declared here once; `launch` parses the same flags with this command's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibjob import families
from calibjob.cli.base import (
    ForceOpt,
    OutputOpt,
    ProgressOpt,
    ShardOpt,
    app,
    build_config,
    check_output,
    merge_if_complete,
    print_result,
)
from calibjob.cli.help import Command
from calibjob.config import JobConfig, spec_names

_PAPER = JobConfig()  # the paper's defaults, shown in --help from their one home
_H, _W = _PAPER.latent_size
_LATENT = f"{_H} {_W} = {8 * _H}x{8 * _W} pixels"


def _latent_side(value: str) -> int:
    """One of --latent-size's two numbers; '32,32' gets told how to write them."""
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a whole number; give H and W as two numbers: --latent-size 32 32"
        ) from None


@app.command(cls=Command)
def run(
    job: Annotated[
        str | None,
        typer.Option(
            "--job",
            metavar="NAME|FILE",
            help=f"Job spec: a shipped one by name ({', '.join(spec_names())}) or a TOML "
            "file; flags override its fields.",
        ),
    ] = None,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="STORE",
            help="Zarr store to create or continue: a folder or s3://bucket/prefix.",
        ),
    ] = "calib.zarr",
    shard: ShardOpt = "0/1",
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version",
            metavar="NAME",
            help="'tiny', 'tiny-flux', 'tiny-flux-dev' (built in), 'sd3-medium', "
            "'sd3.5-large', 'flux-schnell', 'flux-dev' or a DiffusionKit key. "
            f"(paper: {_PAPER.model_version})",
        ),
    ] = None,
    num_fid_samples: Annotated[
        int | None,
        typer.Option(
            "--num-fid-samples",
            metavar="N",
            help=f"Trajectories. (paper: {_PAPER.num_fid_samples})",
        ),
    ] = None,
    num_sampling_steps: Annotated[
        int | None,
        typer.Option(
            "--num-sampling-steps",
            metavar="S",
            help=f"Euler steps per trajectory. (paper: {_PAPER.num_sampling_steps})",
        ),
    ] = None,
    num_selected_steps: Annotated[
        int | None,
        typer.Option(
            "--num-selected-steps",
            metavar="K",
            help=f"Uniformly selected steps kept by merge. (paper: {_PAPER.num_selected_steps})",
        ),
    ] = None,
    latent_size: Annotated[
        tuple[int, int] | None,
        typer.Option(
            "--latent-size",
            metavar="H W",
            parser=_latent_side,
            help="Latent height and width, two even numbers (pixels / 8), e.g. --latent-size "
            f"32 32. (paper: {_LATENT})",
        ),
    ] = None,
    cfg_scale: Annotated[
        float | None,
        typer.Option(
            "--cfg-scale",
            metavar="SCALE",
            help="Classifier-free guidance (SD3: above 1; FLUX.1: 0, none). "
            f"(paper: {_PAPER.cfg_scale})",
        ),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            "--guidance-scale",
            metavar="G",
            help="The guidance scale a guidance-distilled model embeds (FLUX.1-dev); 0 for the "
            f"others. (default: the model's own, {families.FLUX_DEV_GUIDANCE} for FLUX.1-dev)",
        ),
    ] = None,
    prompt_file: Annotated[
        str | None,
        typer.Option(
            "--prompt-file",
            metavar="FILE",
            help="Prompts: .txt (one a line), .csv/.tsv (a column) or .jsonl (a key). "
            f"(default: {_PAPER.prompt_file})",
        ),
    ] = None,
    prompt_column: Annotated[
        str | None,
        typer.Option(
            "--prompt-column",
            metavar="NAME",
            help="The .csv/.tsv column or .jsonl key of the prompts. (default: a column named "
            "prompt, caption or text, else the only one)",
        ),
    ] = None,
    num_prompts: Annotated[
        int | None,
        typer.Option(
            "--num-prompts",
            metavar="N",
            help="Keep the first N prompts of the file; 0 = all. Trajectory k takes prompt "
            "k % N. (default: 0)",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            metavar="SEED",
            help=f"Job seed: noise of trajectory k and the merge shuffle. (default: {_PAPER.seed})",
        ),
    ] = None,
    low_memory_mode: Annotated[
        bool | None,
        typer.Option(
            "--low-memory-mode/--no-low-memory-mode",
            help="Free the text encoders before denoising. (default: on)",
        ),
    ] = None,
    local_ckpt: Annotated[
        str | None,
        typer.Option(
            "--local-ckpt",
            metavar="FILE",
            help="Local MMDiT/VAE checkpoint (.safetensors) instead of the hub.",
        ),
    ] = None,
    shift: Annotated[
        float | None,
        typer.Option(
            "--shift",
            metavar="SHIFT",
            help=f"Schedule shift; SD3's own is 3.0. (default: {_PAPER.shift})",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            metavar="B",
            help="Trajectories of one prompt per model call; 0 = auto for the device. (default: 0)",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="auto, float32, float16 or bfloat16; auto = float32 on CPU, float16 on GPU.",
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(
            "--max-memory",
            metavar="GB",
            help="GB the auto batch size may plan for (a machine shared with other work, e.g. "
            "12 on a 16 GB Mac); 0 = the device's own (Metal: recommended working set; CUDA: "
            "the card). Encoding the prompts needs ~11.9 GB for SD3 (float16) whatever the "
            "cap; a smaller cap is noted. (default: 0)",
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="mx.compile the Euler step; default: on a GPU only, and on an NVIDIA GPU the "
            "fused step (compile = \"fused\" in a job file: the step's token passes as single "
            "CUDA kernels). --compile alone is the generic compiled step. Fixed per store (on a "
            "GPU the paths differ in their last bits).",
        ),
    ] = None,
    progress: ProgressOpt = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Generate trajectories of a job (or one shard of it) into a Zarr store.

    Creates the store or continues the existing one, encodes the prompts once, then works
    through this shard's units, skipping what is done. Example:

        calibjob run --job dry-run --model-version tiny \\
            --store out/dry.zarr --shard 0/2
    """
    from calibjob import api
    from calibjob.core.locations import normalize
    from calibjob.core.shards import parse_shard
    from calibjob.jobs.run import RUN

    store = normalize(store)
    api.watch(store)

    cfg = build_config(
        job,
        model_version=model_version,
        num_fid_samples=num_fid_samples,
        num_sampling_steps=num_sampling_steps,
        num_selected_steps=num_selected_steps,
        latent_size=list(latent_size) if latent_size else None,
        cfg_scale=cfg_scale,
        guidance_scale=guidance_scale,
        prompt_file=prompt_file,
        prompt_column=prompt_column,
        num_prompts=num_prompts,
        seed=seed,
        low_memory_mode=low_memory_mode,
        local_ckpt=local_ckpt,
        shift=shift,
        batch_size=batch_size,
        dtype=dtype,
        max_memory=max_memory,
        compile=None if compile is None else ("on" if compile else "off"),
    )
    sh = parse_shard(shard)
    check_output(output, force)
    res = api.run(RUN, cfg, store, [sh], progress=progress)
    print_result(res, store, str(sh), RUN)
    merge_if_complete(store, output, force, str(sh))


def job_flags_config(args: list[str]) -> tuple[JobConfig, Path | None, bool]:
    """Parse `run`'s job flags (given to `launch`) with `run`'s own parser, so the two accept
    exactly the same flags; the job config built from them, and `-o`/`--force`."""
    from calibjob.errors import ConfigError

    run_cmd = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    with run_cmd.make_context("calibjob launch", list(args)) as rctx:
        params = dict(rctx.params)
    for own in ("store", "shard"):
        if params.get(own) != next(p.default for p in run_cmd.params if p.name == own):
            raise ConfigError(f"launch sets --{own} of each shard itself (use --store, --shards)")
    job = params.pop("job", None)
    ls = params.get("latent_size")
    params["latent_size"] = list(ls) if ls else None
    output, force = params.pop("output", None), bool(params.pop("force", False))
    for k in ("store", "shard", "progress"):
        params.pop(k, None)
    c = params.get("compile")
    params["compile"] = None if c is None else ("on" if c else "off")
    return build_config(job, **params), output, force


