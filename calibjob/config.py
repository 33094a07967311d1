"""The job's parameters: the paper's defaults, job-spec (TOML) loading, validation, fingerprint.

This module is the one place the paper's numbers live (besides the job specs in `jobs/`).
Field names are the spec's CLI names with dashes turned into underscores, so a job spec,
a CLI flag and the store's saved config all speak the same words.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from calibjob import families
from calibjob.core.spec import Spec
from calibjob.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# the models and their families' facts live in calibjob.families; re-exported for the callers
SD3_MEDIUM, TINY = families.SD3_MEDIUM, families.TINY
canonical_model = families.canonical_model


# Fields that change the data a job produces; two stores can be merged only if these agree.
# (low_memory_mode, prompt_file, prompt_column, num_prompts, local_ckpt and max_memory change
# how, not what: the prompts' text is compared, and max_memory only steers the auto batch size,
# which is an identity field.)
IDENTITY_FIELDS = (
    "model_version",
    "num_fid_samples",
    "num_sampling_steps",
    "num_selected_steps",
    "latent_size",
    "cfg_scale",
    "guidance_scale",
    "seed",
    "shift",
    "batch_size",
    "dtype",
    "compile",  # on a GPU compiled and eager steps differ in their last bits
    "prompts",
)
# Fields a job may leave to the device; resolved once, when the store is created, then fixed.
AUTO_FIELDS = {"dtype": "auto", "batch_size": 0, "compile": "auto"}
# Identity fields added after stores existed, with the value every older store had: left out of
# the fingerprint at that value, so an older store keeps its fingerprint.
LATER_FIELDS = {"guidance_scale": 0.0}


def step_compiled(compile: str) -> bool:
    """Whether a resolved `compile` value compiles the step ('on', or 'fused': compiled, with
    models/fused_block.py's blocks)."""
    return compile in ("on", "fused")


@dataclass(frozen=True)
class JobConfig(Spec):
    """Every parameter of a calibration job. Defaults are the paper's (TaQ-DiT, Sec. IV-A)."""

    IDENTITY = IDENTITY_FIELDS
    AUTO = AUTO_FIELDS
    LATER = LATER_FIELDS

    model_version: str = SD3_MEDIUM
    num_fid_samples: int = 256  # trajectories
    num_sampling_steps: int = 100
    num_selected_steps: int = 25
    latent_size: tuple[int, int] = (32, 32)  # 256x256 pixels
    cfg_scale: float = 1.5  # classifier-free guidance (SD3); 0 = none (FLUX.1)
    # the guidance embedding's scale (FLUX.1-dev; 0 for models without one); None: the model's
    # own default, fixed when the job is prepared (calibjob.families)
    guidance_scale: float | None = None
    prompt_file: str = "prompts/sample_prompts.txt"
    prompt_column: str | None = None  # .csv/.tsv/.jsonl: None = prompt, caption or text column
    num_prompts: int = 0  # keep the first N prompts of the file; 0 = all
    seed: int = 0
    shift: float = 3.0  # SD3's own schedule (DiffusionPipeline's class default 1.0 is not SD3's)
    batch_size: int = 0  # trajectories of one prompt per model call; 0 = choose for the device
    dtype: str = "auto"  # activation/weight dtype; auto = float32 on CPU, float16 on a GPU
    # the Euler step: on (mx.compile), off (eager), fused (compiled, with the token passes of
    # models/fused_block.py as single CUDA kernels); auto = fused on an NVIDIA GPU, on on Metal,
    # off on CPU
    compile: str = "auto"
    low_memory_mode: bool = True  # free the text encoders before denoising
    # GB the auto batch size may plan for (0 = what the device offers); it only steers the
    # auto choice, which the store then fixes, so it is not part of the job's identity
    max_memory: float = 0.0
    local_ckpt: str | None = None
    prompts: tuple[str, ...] = field(default=())  # filled from prompt_file by `resolve`

    @property
    def model(self) -> families.ModelInfo:
        return families.model_info(self.model_version)

    def with_model_defaults(self) -> JobConfig:
        """The model's key for its name, and its own guidance scale where the job left it open."""
        info = self.model
        g = info.default_guidance if self.guidance_scale is None else self.guidance_scale
        return self.replace(model_version=info.key, guidance_scale=float(g))

    def validate(self) -> JobConfig:
        """Raise ConfigError for values no run could use; return self for chaining."""
        if self.num_fid_samples < 1:
            raise ConfigError("--num-fid-samples must be at least 1")
        if self.num_sampling_steps < 1:
            raise ConfigError("--num-sampling-steps must be at least 1")
        if not 1 <= self.num_selected_steps <= self.num_sampling_steps:
            raise ConfigError(
                f"--num-selected-steps must be between 1 and --num-sampling-steps "
                f"({self.num_sampling_steps}), got {self.num_selected_steps}"
            )
        h, w = self.latent_size
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ConfigError(
                f"--latent-size must be two even numbers (MMDiT patches are 2x2), got {h} {w}"
            )
        families.check_guidance(
            families.model_info(self.model_version), self.cfg_scale, self.guidance_scale or 0.0
        )
        if self.shift <= 0:
            raise ConfigError(f"--shift must be positive, got {self.shift}")
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be 0 (auto) or positive, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype}"
            )
        if self.compile not in ("auto", "on", "off", "fused"):
            raise ConfigError(f"compile must be auto, on, off or fused, got {self.compile!r}")
        if self.num_prompts < 0:
            raise ConfigError(f"--num-prompts must be 0 (all) or positive, got {self.num_prompts}")
        if self.max_memory < 0:
            raise ConfigError(
                f"--max-memory must be 0 (the device's) or positive GB, got {self.max_memory}"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> JobConfig:
        if "latent_size" in d:
            ls = d["latent_size"]
            if not isinstance(ls, list | tuple) or len(ls) != 2:
                raise ConfigError(f"latent_size must be two integers, got {ls!r}")
            d = {**d, "latent_size": (int(ls[0]), int(ls[1]))}
        return super().from_dict(d)


SPECS = Path(__file__).resolve().parent / "specs"  # jobs/*.toml, shipped in the package


def spec_names() -> list[str]:
    """The shipped job specs, by name (`--job paper`)."""
    return sorted(p.stem for p in SPECS.glob("*.toml"))


def find_job_spec(job: str | Path) -> Path:
    """A job spec given as a path (as typed, then relative to the project) or a shipped name."""
    p = Path(job)
    for cand in (p, PROJECT_ROOT / p, SPECS / f"{job}.toml"):
        if cand.is_file():
            return cand
    raise ConfigError(
        f"job spec not found: {job} (not a file here, nor a shipped spec: "
        f"{', '.join(spec_names())})"
    )


def load_job_file(path: str | Path) -> dict:
    """Read a job spec (TOML, a path or a shipped name) into a dict of fields; unknown fields
    are refused."""
    p = find_job_spec(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"job spec {path} is not valid TOML: {e}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(JobConfig)} - {"prompts"})
    if unknown or "prompts" in data:
        bad = unknown + (["prompts"] if "prompts" in data else [])
        raise ConfigError(f"unknown job field(s) in {path}: {', '.join(bad)}")
    return data


def resolve_prompt_path(prompt_file: str) -> Path:
    """A prompt file as given, else relative to the project root, else a shipped one
    (`prompts/sample_prompts.txt` of the job specs)."""
    p = Path(prompt_file)
    if p.exists() or p.is_absolute():
        return p
    for q in (PROJECT_ROOT / p, Path(__file__).resolve().parent / "sample_prompts" / p.name):
        if q.exists():
            return q
    return p


# How long a worker's lease on a unit lives without a heartbeat (the heartbeat comes every
# sixth of it): a worker frozen longer than this loses its units to others.
LEASE_TTL_S = float(os.environ.get("CALIBJOB_LEASE_TTL_S", "300"))


# ---- phase 2: activation profiles (`calibjob profile`) --------------------------------------
# The histogram every (layer, input, timestep) gets: bins over [-range, range], plus counts
# below and above. 512 bins over [-8, 8] (bins of 1/32) are what TaQ-DiT-style profiles use.
PROFILE_HIST_BINS = 512
PROFILE_HIST_RANGE = 8.0
# A work unit of `profile` holds points of one timestep, at most this many (whole batches).
PROFILE_UNIT_POINTS = 1024
