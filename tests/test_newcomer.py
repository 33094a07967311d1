"""What a newcomer hits, following the README on the tiny model: store folders, one store per
machine, Ctrl-C and SIGTERM, damaged data in status, --local-ckpt, numbers, outputs, words; and
the spec script's habits: `run -o`, progress in a log file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_same_npz, cli, popen
from test_job import done_count, flags, merge, tree_digest

from calibjob.jobs import open_store, store_exists

pytestmark = pytest.mark.e2e


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("calibjob: error:"), stderr
    return lines[0]


# ---- 1. a store never writes into a folder of the user's ------------------------------------


def test_run_refuses_a_folder_that_is_not_a_store(prompt_file, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "important.txt").write_text("keep")
    proc = cli("run", *flags(prompt_file), "--store", str(folder), check=False)
    assert proc.returncode == 2 and "important.txt" in one_line_error(proc.stderr)
    assert sorted(os.listdir(folder)) == ["important.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cli("run", *flags(prompt_file), "--store", str(empty))  # an empty folder is fine
    assert store_exists(empty)


# ---- 2. one store per machine -----------------------------------------------------------------


def test_one_store_per_machine_status_merge_resume(baseline, prompt_file, tmp_path):
    s0, s1 = tmp_path / "s0.zarr", tmp_path / "s1.zarr"
    cli("run", *flags(prompt_file), "--store", str(s0), "--shard", "0/2")
    st = cli("status", str(s0), check=False)
    assert st.returncode == 0 and "complete here" in st.stdout and "1/2" in st.stdout, st.stdout
    m = cli("merge", str(s0), "-o", str(tmp_path / "x.npz"), check=False)
    assert m.returncode == 2 and "shard 1/2" in one_line_error(m.stderr)
    before = [tree_digest(s0 / d) for d in ("xs", "done")]
    r = cli("resume", str(s0), "--no-progress")  # continues only the shard it holds: done
    assert "nothing left to do" in r.stdout
    assert [tree_digest(s0 / d) for d in ("xs", "done")] == before  # no other shard's work
    cli("run", *flags(prompt_file), "--store", str(s1), "--shard", "1/2")
    assert_same_npz(merge([s0, s1], tmp_path / "both.npz"), baseline[1])


# ---- 3. Ctrl-C and SIGTERM --------------------------------------------------------------------


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed calibjob's handlers (Python alone catches SIGINT, never
    SIGTERM): the first moment calibjob itself answers a signal, observed, not timed."""
    try:
        caught = next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def wait_until(pred, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.005)


@pytest.mark.parametrize(
    "sig,moment",
    [(signal.SIGINT, "started"), (signal.SIGINT, "store created"),
     (signal.SIGTERM, "store created"), (signal.SIGINT, "mid-run"), (signal.SIGTERM, "mid-run")],
)  # fmt: skip
def test_ctrl_c_and_sigterm_at_any_moment_say_one_line(sig, moment, baseline, prompt_file,
                                                        tmp_path):  # fmt: skip
    store = tmp_path / "int.zarr"
    # the console script's own entry (python -m calibjob), which handles signals first thing
    p = subprocess.Popen(
        [sys.executable, "-m", "calibjob", "run", *flags(prompt_file, **{"batch-size": 1}),
         "--store", str(store)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # moments seen, not timed: the handlers in place (imports under way), the store created
    # (the model loading or the prompts encoding), a unit durable (the unit loop)
    if moment == "started":
        wait_until(lambda: handles_sigterm(p.pid), "calibjob's signal handlers")
    elif moment == "store created":
        wait_until(lambda: store_exists(store), "the store")
    else:
        wait_until(lambda: done_count(store) >= 1, "a unit done")
    p.send_signal(sig)
    _, errout = p.communicate(timeout=120)
    assert p.returncode == 130, errout
    progress = "calibjob: shard"  # the log lines of a run whose stderr is not a terminal
    lines = [ln for ln in errout.splitlines() if ln.strip() and not ln.startswith(progress)]
    assert "Traceback" not in errout and len(lines) == 1, errout
    assert lines[0].startswith("calibjob: interrupted"), errout
    if moment == "mid-run":
        assert "trajectories are safe in" in lines[0] and "calibjob resume" in lines[0]
        assert not [f for f in (store / "claims").iterdir() if f.name.isdigit()]
    if store_exists(store):
        cli("resume", str(store), "--no-progress")
        a = merge(store, tmp_path / "a.npz")
        b1 = tmp_path / "b1.zarr"
        cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(b1))
        assert_same_npz(a, merge(b1, tmp_path / "b.npz"))


def test_ctrl_c_on_launch_stops_the_workers_and_status_says_interrupted(prompt_file, tmp_path):
    store = tmp_path / "l.zarr"
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "calibjob", "launch",
             *flags(prompt_file, **{"batch-size": 1, "num-sampling-steps": 120}),
             "--store", str(store), "--shards", "2"],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while done_count(store) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        assert p.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text and "calibjob: interrupted" in text, text
    st = cli("status", str(store), check=False)
    assert st.returncode == 1 and "interrupted" in st.stdout, st.stdout
    assert "ETA" not in st.stdout and "no worker is running" in st.stdout
    assert "failed" not in st.stdout


# ---- 4. status checks the data it reports ----------------------------------------------------


def test_status_finds_missing_and_truncated_chunks_and_verify_finds_flips(baseline, tmp_path):
    store = tmp_path / "d.zarr"
    shutil.copytree(baseline[0], store)
    (store / "xs/c/1/0/0/0/0").unlink()
    c4 = store / "xs/c/4/0/0/0/0"
    c4.write_bytes(c4.read_bytes()[:1000])
    st = cli("status", str(store), check=False)
    assert st.returncode == 1 and "damaged" in st.stdout and "1, 4" in st.stdout, st.stdout
    assert "complete" not in st.stdout.replace("complete here", "")
    flipped = tmp_path / "f.zarr"
    shutil.copytree(baseline[0], flipped)
    c2 = flipped / "xs/c/2/0/0/0/0"
    raw = bytearray(c2.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    c2.write_bytes(bytes(raw))
    assert cli("status", str(flipped)).returncode == 0  # the cheap check sees sizes only
    v = cli("status", "--verify", str(flipped), check=False)
    assert v.returncode == 1 and "damaged" in v.stdout and "(2)" in v.stdout, v.stdout


# ---- 5. --local-ckpt ---------------------------------------------------------------------------


def test_a_missing_local_checkpoint_is_named(prompt_file, tmp_path):
    store = tmp_path / "ck.zarr"
    proc = cli("run", *flags(prompt_file), "--local-ckpt", "/nonexistent.safetensors",
               "--store", str(store), check=False)  # fmt: skip
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "/nonexistent.safetensors" in line and "no such file" in line
    assert not store.exists()


# ---- 7. one throughput ------------------------------------------------------------------------


def test_run_status_and_log_lines_report_one_throughput(prompt_file, tmp_path):
    store = tmp_path / "rate.zarr"
    t0 = time.monotonic()
    res = cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store))
    wall = time.monotonic() - t0
    line = next(ln for ln in res.stdout.splitlines() if "traj-steps/s" in ln)
    rate = float(line.split("units, ")[1].split(" traj-steps/s")[0])
    steps = 6 * 20
    # denoising throughput: model load and prompt encoding do not count
    assert rate > steps / wall * 1.2, (rate, steps / wall)
    assert "wall time" in line and "6 trajectories in 6 units" in line
    recorded = open_store(store, mode="r").progress()["0/1"]["rate"]
    assert abs(recorded - rate) / rate < 0.25, (recorded, rate)
    st = cli("status", str(store))
    assert "traj-steps/s" in st.stdout and f"{recorded:.1f}" in st.stdout


# ---- 8. outputs -----------------------------------------------------------------------------


def test_preview_writes_the_format_its_suffix_names_and_never_overwrites(baseline, tmp_path):
    jpg = tmp_path / "z.jpg"
    cli("preview", str(baseline[0]), "-o", str(jpg), "--n", "2")
    assert jpg.read_bytes()[:2] == b"\xff\xd8"  # JPEG, not PNG bytes under a .jpg name
    again = cli("preview", str(baseline[0]), "-o", str(jpg), "--n", "2", check=False)
    assert again.returncode == 2 and "--force" in one_line_error(again.stderr)
    bad = cli("preview", str(baseline[0]), "-o", str(tmp_path / "z.txt"), check=False)
    assert bad.returncode == 2 and ".png" in one_line_error(bad.stderr)
    assert not list(tmp_path.glob(".z.*"))  # no temporary file left


def test_inspect_plot_never_overwrites_without_force(baseline, tmp_path):
    npz = baseline[1]
    plot = tmp_path / "p.png"
    plot.write_bytes(b"keep me")
    proc = cli("inspect", str(npz), "--plot", str(plot), check=False)
    assert proc.returncode == 2 and "--force" in one_line_error(proc.stderr)
    assert plot.read_bytes() == b"keep me"
    cli("inspect", str(npz), "--plot", str(plot), "--force")
    assert plot.read_bytes()[:4] == b"\x89PNG"


# ---- 9. words ---------------------------------------------------------------------------------


def test_words(baseline, prompt_file, tmp_path):
    one = cli("run", *flags(prompt_file, **{"num-fid-samples": 1, "batch-size": 1}),
              "--store", str(tmp_path / "one.zarr"))  # fmt: skip
    assert "1 trajectory in 1 unit," in one.stdout, one.stdout
    twice = cli("merge", str(baseline[0]), str(baseline[0]), "-o", str(tmp_path / "t.npz"),
                check=False)  # fmt: skip
    assert "same store was given twice" in one_line_error(twice.stderr)
    other = cli("run", *flags(prompt_file, seed=9), "--store", str(baseline[0]), check=False)
    assert f"calibjob resume {baseline[0]}" in one_line_error(other.stderr)


# ---- the spec script's habits: run -o, progress in a log file ---------------------------------


def test_run_o_merges_when_the_job_completes(baseline, prompt_file, tmp_path):
    out = tmp_path / "DiT_cali_data.npz"
    res = cli("run", *flags(prompt_file), "--store", str(tmp_path / "o.zarr"), "-o", str(out))
    assert f"wrote {out}" in res.stdout
    assert_same_npz(out, baseline[1])
    exists = cli("run", *flags(prompt_file), "--store", str(tmp_path / "o.zarr"), "-o", str(out),
                 check=False)  # fmt: skip
    assert exists.returncode == 2 and "--force" in one_line_error(exists.stderr)


def test_run_o_with_three_shards_merges_exactly_once(baseline, prompt_file, tmp_path):
    out, store = tmp_path / "three.npz", tmp_path / "three.zarr"
    procs = [popen("run", *flags(prompt_file), "--store", str(store), "--shard", f"{i}/3",
                   "-o", str(out)) for i in range(3)]  # fmt: skip
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
        outs.append(o)
    assert sum(f"wrote {out}" in o for o in outs) == 1, outs
    assert_same_npz(out, baseline[1])


def test_a_log_file_shows_progress_lines(prompt_file, tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "calibjob", "run", *flags(prompt_file, **{"batch-size": 1}),
             "--store", str(tmp_path / "log.zarr")],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300,
        ).returncode  # fmt: skip
    assert rc == 0
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("calibjob: shard 0/1:")]
    # run's first line, before the model loads; then the first unit, at most one per 30 s, the last
    assert lines.pop(0) == "calibjob: shard 0/1: 6 trajectories in 6 units to compute; loading tiny"
    assert len(lines) >= 2, text
    assert lines[-1].startswith("calibjob: shard 0/1: 6/6 trajectories,")
    for ln in lines:
        assert "traj-steps/s" in ln and "ETA" in ln and "peak memory" in ln and "GB" in ln
    assert "\r" not in text and "━" not in text and "█" not in text
    assert open_store(tmp_path / "log.zarr", mode="r").done_mask().all()
