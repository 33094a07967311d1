"""Pure arithmetic: work units, shards, step selection, shuffling, noise, config."""

from __future__ import annotations

import numpy as np
import pytest

from calibjob.config import JobConfig, load_job_file
from calibjob.core.shards import Shard, parse_shard
from calibjob.errors import ConfigError
from calibjob.jobs.run import work_units
from calibjob.selection import initial_noise, select_steps, shuffle_order

pytestmark = pytest.mark.core


def test_units_group_by_prompt_and_cover_every_trajectory_once():
    units = work_units(256, 20, 8)
    trajs = sorted(k for u in units for k in u.trajectories)
    assert trajs == list(range(256))
    for u in units:
        assert len(u.trajectories) <= 8
        assert all(k % 20 == u.prompt for k in u.trajectories)
    # prompt 0 has 13 trajectories (0, 20, ..., 240): units of 8 and 5
    assert [len(u.trajectories) for u in units if u.prompt == 0] == [8, 5]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_units_whatever_the_count(n):
    units = work_units(40, 6, 3)
    got = sorted(u.index for i in range(n) for u in Shard(i, n).units(units))
    assert got == [u.index for u in units]


def test_units_do_not_depend_on_shard_count():
    # the unit list is a function of (N, P, batch) only: shard i/n slices it
    assert work_units(30, 7, 4) == work_units(30, 7, 4)
    assert Shard(1, 3).units(work_units(30, 7, 4))[0] == work_units(30, 7, 4)[1]


@pytest.mark.parametrize("bad", ["3/2", "0/0", "-1/2", "a/b", "1", "", "1/2/3"])
def test_bad_shard_specs_are_refused(bad):
    with pytest.raises(ConfigError):
        parse_shard(bad)


def test_shard_auto_reads_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert parse_shard("auto") == Shard(2, 3)


def test_linspace_selection_is_the_specs():
    sel = select_steps(100, 25)
    assert sel[0] == 0 and sel[-1] == 99 and len(sel) == 25
    assert list(sel[:4]) == [0, 4, 8, 12]
    assert np.array_equal(sel, np.linspace(0, 99, 25, dtype=int))


def test_stride_selection_is_taqdits():
    assert list(select_steps(100, 25, "stride")) == list(range(0, 100, 4))
    assert list(select_steps(20, 5, "stride")) == [0, 4, 8, 12, 16]


def test_selection_refuses_more_than_available():
    with pytest.raises(ValueError):
        select_steps(5, 6)


def test_shuffle_is_a_seeded_permutation():
    a, b = shuffle_order(6400, 0), shuffle_order(6400, 0)
    assert np.array_equal(a, b)
    assert np.array_equal(np.sort(a), np.arange(6400))
    assert not np.array_equal(a, shuffle_order(6400, 1))


def test_noise_is_diffusionkits_convention():
    np.random.seed(5 + 3)
    expected = np.random.randn(1, 16, 8, 6).transpose(0, 2, 3, 1)[0].astype(np.float32)
    assert np.array_equal(initial_noise(5, 3, (8, 6), 16), expected)


def test_paper_spec_holds_the_paper_numbers():
    cfg = JobConfig.from_dict(load_job_file("jobs/paper.toml"))
    assert (cfg.num_fid_samples, cfg.num_sampling_steps, cfg.num_selected_steps) == (256, 100, 25)
    assert cfg.cfg_scale == 1.5 and cfg.latent_size == (32, 32) and cfg.shift == 3.0
    assert cfg == JobConfig()  # the spec and the config module's defaults agree


def test_unknown_job_field_is_refused(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("num_fid_samples = 8\nnum_sampling_stepz = 20\n")
    with pytest.raises(ConfigError, match="num_sampling_stepz"):
        load_job_file(p)


def test_fingerprint_and_differing_fields():
    a = JobConfig(prompts=("x", "y"))
    b = a.replace(seed=3, cfg_scale=2.0)
    assert a.fingerprint() != b.fingerprint()
    assert a.differing(b) == ["cfg_scale", "seed"]
    assert a.fingerprint() == a.replace(low_memory_mode=False).fingerprint()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"latent_size": (31, 32)}, "latent-size"),
        ({"num_selected_steps": 30, "num_sampling_steps": 20}, "num-selected-steps"),
        ({"num_fid_samples": 0}, "num-fid-samples"),
        ({"model_version": "sd4"}, "model-version"),
    ],
)
def test_validation(change, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig(**change).validate()
