"""The models calibjob runs, and what each family's protocol is, without importing MLX.

A model belongs to a family (`sd3` or `flux`); the family's MLX side (loading, prompt encoding,
sampler, the MMDiT's pieces) lives in `calibjob/models/sd3.py` and `calibjob/models/flux.py`.
This module holds only facts the CLI, the job specs and the memory plan need before any model
loads: names, DiffusionKit's keys, how a model is guided, its text length and its footprint.

Guidance, the one thing that differs most between the families:

- `cfg`: classifier-free guidance, a CFG batch of two branches per trajectory, the prompt and
  the empty prompt (SD3: `CFGDenoiser` with `cfg_weight > 1`).
- `none`: one branch, the prompt (FLUX.1-schnell: DiffusionKit's FLUX encoding drops the
  negative prompt and `CFGDenoiser` with `cfg_weight <= 0` runs one branch).
- `embedded`: one branch, the guidance scale fed to the network through its guidance
  embedding (FLUX.1-dev, a guidance-distilled model).
"""

from __future__ import annotations

from dataclasses import dataclass

from calibjob.errors import ConfigError

GUIDANCE_MODES = ("cfg", "none", "embedded")
LATENT_CHANNELS = 16  # both families' VAEs (SD3's and FLUX.1's autoencoders) have 16


@dataclass(frozen=True)
class ModelInfo:
    """One model: its key (DiffusionKit's, or a built-in name) and its protocol facts."""

    key: str
    family: str  # "sd3" | "flux"
    aliases: tuple[str, ...] = ()
    guidance: str = "cfg"  # see the module docstring
    default_guidance: float = 0.0  # the embedded guidance scale when the job leaves it open
    builtin: bool = False  # built into calibjob (toy size, seeded weights, no download)
    t5_tokens: int = 0  # T5 tokens of the conditioning (SD3 adds 77 CLIP tokens before them)
    params: float = 0.0  # MMDiT parameters (for the memory plan; 0: too small to count)
    width: int = 64  # MMDiT hidden size (the memory plan scales activations by it)
    encode_gb: float = 0.0  # peak of the encode phase in float16/bfloat16 (text encoders alone)
    gpu_dtype: str = "float16"  # the half precision 'auto' takes on a GPU (DiffusionKit's)
    # activations per token and width against SD3's measured ones (calibjob.device): FLUX.1's
    # unified blocks hold more. Measured on an H200 (bench/flux_gpu.py, bfloat16, compiled):
    # 2.43 GB per trajectory at 1024x1024 (4,352 tokens), 0.29 at 256x256, 1.4x SD3's per token
    # and width.
    activation_scale: float = 1.0

    @property
    def branches(self) -> int:
        """Rows of the model call per trajectory: 2 under CFG, else 1."""
        return 2 if self.guidance == "cfg" else 1

    @property
    def text_tokens(self) -> int:
        return self.t5_tokens + (77 if self.family == "sd3" else 0)

    @property
    def name(self) -> str:
        """The short name users type (`flux-schnell`), else the key."""
        return self.aliases[0] if self.aliases else self.key


SD3_MEDIUM = "argmaxinc/mlx-stable-diffusion-3-medium"
FLUX_SCHNELL = "argmaxinc/mlx-FLUX.1-schnell"
FLUX_DEV = "argmaxinc/mlx-FLUX.1-dev"
TINY = "tiny"
TINY_FLUX = "tiny-flux"
TINY_FLUX_DEV = "tiny-flux-dev"

# The encode phase, text encoders loaded alone, half precision. SD3's (CLIP-L, CLIP-G, T5-XXL)
# peak at 11.89 GB (H200, bench/hub_e2e.py); FLUX.1's (CLIP-L, T5-XXL: 9.77 GB of weights) at
# 10.39 GB with 256 T5 tokens and 10.40 with 512 (H200, bench/flux_gpu.py --encode).
_SD3_ENCODE_GB = 11.9
_FLUX_ENCODE_GB = 10.4
# FLUX.1's MMDiT (19 joint + 38 unified blocks, hidden 3072): 11.9e9 parameters
_FLUX_PARAMS = 11.9e9
_FLUX_ACTIVATIONS = 1.4
# Guidance-distilled FLUX.1-dev's default guidance scale (DiffusionKit's CLI and the model's own)
FLUX_DEV_GUIDANCE = 3.5

def _flux(key: str, aliases: tuple[str, ...] = (), **facts) -> ModelInfo:
    """A FLUX.1 model: bfloat16 on a GPU, FLUX.1's activations, its text encoders."""
    facts = {"gpu_dtype": "bfloat16", "activation_scale": _FLUX_ACTIVATIONS, **facts}
    if not facts.get("builtin"):
        facts = {"params": _FLUX_PARAMS, "width": 3072, "encode_gb": _FLUX_ENCODE_GB, **facts}
    return ModelInfo(key, "flux", aliases, **facts)


def _sd3(key: str, aliases: tuple[str, ...] = (), **facts) -> ModelInfo:
    if not facts.get("builtin"):
        facts = {"t5_tokens": 512, "encode_gb": _SD3_ENCODE_GB, **facts}
    return ModelInfo(key, "sd3", aliases, **facts)


MODELS: tuple[ModelInfo, ...] = (
    _sd3(TINY, builtin=True, t5_tokens=32),
    _flux(TINY_FLUX, guidance="none", builtin=True, t5_tokens=32),
    _flux(TINY_FLUX_DEV, guidance="embedded", default_guidance=FLUX_DEV_GUIDANCE, builtin=True,
          t5_tokens=64),
    _sd3(SD3_MEDIUM, ("sd3-medium", "sd3"), params=2.085e9, width=1536),
    _sd3("argmaxinc/mlx-stable-diffusion-3.5-large", ("sd3.5-large",), params=8.146e9, width=2432),
    _sd3("argmaxinc/mlx-stable-diffusion-3.5-large-4bit-quantized", params=8.146e9 / 4,
         width=2432),
    _flux(FLUX_SCHNELL, ("flux-schnell",), guidance="none", t5_tokens=256),
    _flux("argmaxinc/mlx-FLUX.1-schnell-4bit-quantized", guidance="none", t5_tokens=256,
          params=_FLUX_PARAMS / 4),
    _flux(FLUX_DEV, ("flux-dev",), guidance="embedded", default_guidance=FLUX_DEV_GUIDANCE,
          t5_tokens=512),
)
_BY_NAME = {n: m for m in MODELS for n in (m.key, *m.aliases)}


def names() -> list[str]:
    """What --model-version accepts: built-in names, short names, then DiffusionKit's keys."""
    short = [a for m in MODELS for a in m.aliases[:1]]
    return [*(m.key for m in MODELS if m.builtin), *short,
            *(m.key for m in MODELS if not m.builtin)]  # fmt: skip


def model_info(name: str) -> ModelInfo:
    """A model by any of its names; one line naming the choices otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            f"unknown --model-version {name!r}; choose one of: {', '.join(names())}"
        ) from None


def canonical_model(name: str) -> str:
    """'flux-schnell' -> DiffusionKit's key; built-in names stay."""
    return model_info(name).key


def check_guidance(info: ModelInfo, cfg_scale: float, guidance_scale: float) -> None:
    """Refuse guidance settings the model cannot take, in one line that says what it can."""
    if info.guidance == "cfg":
        if cfg_scale <= 1.0:
            raise ConfigError(
                f"--cfg-scale must be above 1.0 for {info.name} (it runs with classifier-free "
                f"guidance), got {cfg_scale}"
            )
        if guidance_scale:
            raise ConfigError(f"{info.name} has no guidance embedding: leave --guidance-scale 0")
        return
    if cfg_scale != 0:
        raise ConfigError(
            f"{info.name} runs without classifier-free guidance (DiffusionKit's FLUX.1 drops "
            f"the negative prompt): pass --cfg-scale 0, or start from --job {_job_for(info)}"
        )
    if info.guidance == "none" and guidance_scale:
        raise ConfigError(f"{info.name} has no guidance embedding: leave --guidance-scale 0")
    if info.guidance == "embedded" and guidance_scale < 0:
        raise ConfigError(f"--guidance-scale must not be negative, got {guidance_scale}")


def _job_for(info: ModelInfo) -> str:
    if info.builtin:
        return "dry-run-flux"
    return "flux-dev" if info.guidance == "embedded" else "flux-schnell"
