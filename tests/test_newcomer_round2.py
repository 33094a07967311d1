"""What a newcomer hit, round 2: each item of the issue as a real command, asserting what the
user sees (one line, the right word, nothing written when nothing should be)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli
from test_job import done_count, flags, merge
from test_reliability import faulty

from calibjob.jobs import open_store, store_exists

pytestmark = pytest.mark.e2e


def one_line(proc: subprocess.CompletedProcess, words: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("calibjob: error:") and words in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root, as in CI); yields a function making one per call."""
    mounts = []

    def make(name: str, opts: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", str(d)], capture_output=True)


# ---- 1, 2, 3: fails late ---------------------------------------------------------------------


def test_an_unwritable_output_folder_is_refused_before_the_work(prompt_file, tmp_path, tmpfs):
    ro = tmpfs("ro", "ro,size=64k")
    store = tmp_path / "r.zarr"
    proc = cli("run", *flags(prompt_file), "--store", str(store), "-o", str(ro / "r.npz"),
               check=False)  # fmt: skip
    one_line(proc, f"cannot write in {ro}")
    assert not store.exists()  # refused before the night's work, not after


def test_a_local_checkpoint_is_checked_before_anything_loads(prompt_file, tmp_path):
    junk = tmp_path / "bad.safetensors"
    junk.write_bytes(b"junk")
    store = tmp_path / "j.zarr"
    t0 = time.monotonic()
    proc = cli("run", *flags(prompt_file), "--model-version", "sd3-medium", "--local-ckpt",
               str(junk), "--store", str(store), check=False)  # fmt: skip
    line = one_line(proc, f"--local-ckpt {junk}: not a safetensors file")
    assert "--local-ckpt PATH" not in line  # never the advice to pass the flag that was passed
    assert not store.exists() and time.monotonic() - t0 < 60
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros(2, np.float32)}, str(other))
    proc = cli("run", *flags(prompt_file), "--model-version", "sd3-medium", "--local-ckpt",
               str(other), "--store", str(store), check=False)  # fmt: skip
    one_line(proc, "not an SD3 MMDiT checkpoint (no MMDiT: its 1 tensors are encoder.weight)")


def test_a_checkpoint_of_another_model_is_said_in_one_short_line(tmp_path):
    from safetensors.numpy import save_file

    from calibjob.checkpoints import mismatch

    f = tmp_path / "large.safetensors"
    names = [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(38)]
    save_file({n: np.zeros(1, np.float32) for n in names}, str(f))
    extras = ",\n".join(f"multimodal_transformer_blocks.{i}.image_transformer_block.w"
                        for i in range(24, 38))  # fmt: skip
    error = f"Received 572 parameters not in model: \n{extras}."  # MLX's words, one name a line
    line = mismatch(str(f), "argmaxinc/mlx-stable-diffusion-3-medium", error)
    assert "\n" not in line and len(line) < 400, line
    assert "looks like a depth-38 MMDiT (SD3.5 Large)" in line and "572 tensors unexpected" in line


# ---- 5: argument errors ------------------------------------------------------------------------


def test_argument_errors_are_one_line_like_every_other(prompt_file):
    line = one_line(cli("run", "--bogus", check=False), "--bogus")
    assert "see `calibjob run -h`" in line
    proc = cli("run", *flags(prompt_file), "--latent-size", "32,32", check=False)
    assert "--latent-size 32 32" in one_line(proc, "--latent-size")


# ---- 6: a store that never held work is no one's -----------------------------------------------


def test_a_store_whose_first_run_failed_takes_the_next_job(prompt_file, tmp_path):
    store = tmp_path / "first.zarr"
    p = faulty("run", *flags(prompt_file), "--store", str(store), faults=("--load-fails",))
    _, e = p.communicate(timeout=300)
    assert p.returncode == 2 and store_exists(store), e
    res = cli("run", *flags(prompt_file, seed=11), "--store", str(store))
    assert "held no work yet (seed: store has 7, asked 11)" in res.stderr, res.stderr
    assert open_store(store, mode="r").config.seed == 11
    assert cli("status", str(store)).returncode == 0


# ---- 7: states and words of status -------------------------------------------------------------


def record(store: Path) -> dict:
    return open_store(store, mode="r").progress()["0/1"]


def test_status_keeps_what_it_knew_and_says_it_once(prompt_file, tmp_path):
    store = tmp_path / "s.zarr"
    args = ("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store))
    p = faulty(*args, faults=("--slow-fsync", "0.3"))
    deadline = time.monotonic() + 120
    while done_count(store) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=120)
    rate = record(store)["rate"]
    st = cli("status", str(store), check=False)
    assert "interrupted" in st.stdout and st.stdout.count("calibjob resume") == 1, st.stdout
    # a resume stopped while its model loads leaves the shard interrupted, its figures kept
    q = faulty("resume", str(store), "--no-progress", faults=("--slow-load", "60"))
    deadline = time.monotonic() + 120
    while record(store).get("pid") != q.pid and time.monotonic() < deadline:
        time.sleep(0.01)
    q.send_signal(signal.SIGINT)
    q.communicate(timeout=120)
    st = cli("status", str(store), check=False)
    assert "interrupted" in st.stdout and "stopped" not in st.stdout, st.stdout
    assert f"{rate:.1f}" in st.stdout
    # a resume that finishes, then one that finds nothing to do: the figures stay
    cli("resume", str(store), "--no-progress")
    done_rate = record(store)["rate"]
    assert "nothing left" in cli("resume", str(store)).stdout
    st = cli("status", str(store))
    assert "finished" in st.stdout and f"{done_rate:.1f}" in st.stdout, st.stdout
    # times in words; --verify says it checked
    f = store / "progress" / "0-of-1" / "zarr.json"
    doc = json.loads(f.read_text())
    doc["attributes"]["updated"] -= 3000
    f.write_text(json.dumps(doc))
    st = cli("status", str(store), "--verify")
    assert "min ago" in st.stdout and " s ago" not in st.stdout, st.stdout
    assert "verified: every done trajectory's checksums pass" in st.stdout


def test_trajectories_a_live_worker_is_computing_are_pending_not_missing(prompt_file, tmp_path):
    store, gate = tmp_path / "p.zarr", tmp_path / "go"
    p = faulty("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store),
               faults=("--hold-second-unit", str(gate)))  # fmt: skip
    deadline = time.monotonic() + 120
    while done_count(store) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    st = cli("status", str(store), check=False)
    gate.touch()
    p.communicate(timeout=300)
    assert "pending trajectories (5)" in st.stdout and "missing" not in st.stdout, st.stdout


# ---- 9: job specs by name ---------------------------------------------------------------------


def test_job_specs_by_name_from_any_folder(tmp_path):
    store = tmp_path / "named.zarr"
    res = subprocess.run(
        [sys.executable, "-m", "calibjob.cli", "run", "--job", "dry-run", "--model-version",
         "tiny", "--num-fid-samples", "2", "--num-sampling-steps", "2", "--num-selected-steps",
         "2", "--store", str(store), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(open_store(store, mode="r").config.prompts) == 20  # the shipped prompts
    line = one_line(cli("run", "--job", "nope", check=False), "job spec not found: nope")
    shipped = line.split("nor a shipped spec: ")[1].rstrip(")").split(", ")
    assert {"dry-run", "paper", "tiny", "flux-schnell", "flux-dev", "sd3.5-large"} <= set(shipped)
    assert shipped == sorted(shipped)
    assert ", ".join(shipped) in " ".join(cli("run", "-h").stdout.split())  # -h names them all


# ---- 10, 12, 17: outputs ------------------------------------------------------------------------


def test_the_suffix_names_the_format_and_is_checked_first(baseline, prompt_file, tmp_path):
    store, _ = baseline
    for name in ("x.h5", "noext"):
        one_line(cli("merge", str(store), "-o", str(tmp_path / name), check=False), ".npz")
    assert not list(tmp_path.iterdir())
    run_store = tmp_path / "r.zarr"
    proc = cli("run", *flags(prompt_file), "--store", str(run_store), "-o",
               str(tmp_path / "r5.png"), check=False)  # fmt: skip
    one_line(proc, ".npz")
    assert not run_store.exists()


def test_profile_report_checks_its_export_and_options_before_any_figure(baseline, tmp_path):
    store, npz = baseline
    prof = tmp_path / "p.zarr"
    cli("profile", str(npz), "--store", str(prof), "--no-progress")
    out = tmp_path / "rep"
    one_line(cli("profile-report", str(prof), "-o", str(out), "--export",
                 str(tmp_path / "rep6.csv"), check=False), ".npz")  # fmt: skip
    for bad in ("0", "-3"):
        one_line(cli("profile-report", str(prof), "-o", str(out), "--timesteps", bad,
                     check=False), "--timesteps must be at least 1")  # fmt: skip
    assert not out.exists()
    # a killed export's temporary file is removed by the next export
    stale = tmp_path / ".stats.npz.99999999.partial.npz"
    stale.write_bytes(b"half")
    cli("profile-report", str(prof), "-o", str(out), "--export", str(tmp_path / "stats.npz"))
    assert (tmp_path / "stats.npz").is_file() and not stale.exists()


def test_a_full_disk_in_merge_says_where_and_that_nothing_is_lost(baseline, tmp_path, tmpfs):
    store, _ = baseline
    small = tmpfs("small", "size=64k")
    proc = cli("merge", str(store), "-o", str(small / "m.npz"), check=False)
    line = one_line(proc, f"disk full while writing {small / 'm.npz'}")
    assert "partial" not in line and "untouched" in line
    assert not list(small.iterdir())


def test_small_things(prompt_file, tmp_path):
    commands = [ln for ln in cli("-h").stdout.splitlines() if ln.startswith("  ")]
    assert len(commands) >= 11 and not [ln for ln in commands if "..." in ln], commands
    proc = cli("run", *flags(prompt_file), "--store", str(tmp_path / "a" / "b.zarr"),
               check=False)  # fmt: skip
    one_line(proc, f"folder {tmp_path / 'a'} does not exist")
    env = {**os.environ, "PATH": "/usr/bin/nonexistent"}
    store = tmp_path / "sl.zarr"
    proc = subprocess.run(
        [sys.executable, "-m", "calibjob.cli", "launch", *flags(prompt_file), "--store",
         str(store), "--executor", "slurm"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    one_line(proc, "sbatch")
    assert not (store / "logs").exists()


# ---- 11: launch --wait shows progress -------------------------------------------------------


def test_launch_wait_shows_each_shards_progress(prompt_file, tmp_path):
    store = tmp_path / "w.zarr"
    res = cli("launch", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store),
              "--shards", "2")  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if "trajectories," in ln and "/2:" in ln]
    assert any(ln.startswith("shard 0/2: 3/3 trajectories") for ln in lines), res.stdout
    assert any(ln.startswith("shard 1/2: 3/3 trajectories") for ln in lines), res.stdout


# ---- 14, 15: exactly one merge; a signal after the work ---------------------------------------


def test_a_complete_store_is_merged_exactly_once(baseline, tmp_path):
    store = tmp_path / "once.zarr"
    import shutil

    shutil.copytree(baseline[0], store)
    out = tmp_path / "o.npz"
    first = cli("resume", str(store), "-o", str(out), "--force")
    assert f"wrote {out}" in first.stdout
    before = out.stat().st_mtime_ns
    again = cli("resume", str(store), "-o", str(out), "--force")
    assert "written by another worker" in again.stdout and f"wrote {out}" not in again.stdout
    assert out.stat().st_mtime_ns == before


def test_a_signal_after_the_last_line_does_not_undo_a_finished_run(prompt_file, tmp_path):
    store = tmp_path / "late.zarr"
    p = faulty("run", *flags(prompt_file), "--store", str(store), faults=("--sigint-at-exit",))
    out, errout = p.communicate(timeout=300)
    assert p.returncode == 0, errout
    assert "interrupted" not in errout and "nothing left" not in out
    assert "trajectories in" in out
    assert merge(store, tmp_path / "m.npz").is_file()


def test_ctrl_c_as_a_run_ends_says_the_work_is_done(baseline, tmp_path):
    """The message of a signal when every trajectory is safe: no advice to resume."""
    from calibjob import api

    text, complete = api.safe_line(str(baseline[0]))
    assert complete and text.startswith("all 6 trajectories are safe in ")


# ---- 4: object-store errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,words",
    [({"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x",
       "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}, "cannot reach http://127.0.0.1:1"),
     ({"AWS_REGION": "us-east-1"}, "no credentials found: set AWS_ACCESS_KEY_ID")],
)  # fmt: skip
def test_object_store_errors_are_one_line(env, words):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "calibjob.cli", "status", "s3://my-bucket/calib/paper.zarr"],
        cwd=ROOT, capture_output=True, text=True, env={**clean, **env}, timeout=300,
    )  # fmt: skip
    one_line(proc, words)
