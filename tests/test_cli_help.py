"""`--help` on every command: whole option names at 80 columns on a terminal and in a pipe,
readable metavars, `-h`, `--version`, launch listing run's job flags, `--latent-size H W`."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from importlib import metadata

import pytest
import typer
from conftest import ROOT, cli

import calibjob
from calibjob.cli import app

pytestmark = pytest.mark.e2e

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]
JOB_FLAGS_SKIPPED_BY_LAUNCH = {"store", "shard", "progress"}
TYPE_LABELS = re.compile(r"<(bool|str|int|float|path|list\[[^>]*\]|int,int)>")


def option_names(command: str) -> list[str]:
    """Every --long and -s name of the command's options (launch: also run's job flags)."""
    cmd = GROUP.commands[command]  # type: ignore[attr-defined]
    params = list(cmd.params)
    if command == "launch":
        run = GROUP.commands["run"]  # type: ignore[attr-defined]
        params += [p for p in run.params if p.name not in JOB_FLAGS_SKIPPED_BY_LAUNCH]
    names = [
        name
        for p in params
        if p.param_type_name == "option"
        for name in (*p.opts, *p.secondary_opts)
    ]
    return [*names, "-h", "--help"]  # the help option is added when a context is made


def help_in_a_pipe(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "80"}
    proc = cli(*args, env=env)
    assert proc.stderr == ""
    return proc.stdout


def help_on_a_terminal(*args: str, columns: int = 80) -> str:
    """The command's output on a pseudo-terminal `columns` wide (no COLUMNS variable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibjob.cli", *args],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as e:  # EIO: the child closed the terminal
            if e.errno != errno.EIO:
                raise
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def check_fits(text: str, names: list[str]) -> None:
    for name in names:
        pattern = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
        assert re.search(pattern, text), f"{name} is not shown whole:\n{text}"
    long_lines = [ln for ln in text.splitlines() if len(ln) > 80]
    assert not long_lines, long_lines
    assert not TYPE_LABELS.search(text), TYPE_LABELS.search(text).group(0)
    usage = next(ln for ln in text.splitlines() if ln.startswith("Usage:"))
    assert "{" not in usage and "<" not in usage, usage


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_in_a_pipe_and_on_a_terminal(command):
    names = option_names(command)
    piped = help_in_a_pipe(command, "--help")
    check_fits(piped, names)
    assert help_in_a_pipe(command, "-h") == piped
    on_tty = help_on_a_terminal(command, "--help")
    check_fits(on_tty, names)
    assert on_tty == piped


def test_top_level_help_version_and_h():
    piped = help_in_a_pipe("--help")
    assert help_in_a_pipe("-h") == piped
    for c in COMMANDS:
        assert re.search(rf"^  {c}\s", piped, re.M), c
    check_fits(piped, ["--version", "--help", "-h"])
    out = cli("--version").stdout.strip()
    assert out == f"calibjob {calibjob.__version__}" == f"calibjob {metadata.version('calibjob')}"


def test_launch_help_lists_the_job_flags_it_takes():
    text = help_in_a_pipe("launch", "--help")
    section = text.split("Job flags", 1)[1]
    for flag in ("--job", "--model-version", "--num-fid-samples", "--latent-size",
                 "--prompt-file", "--prompt-column", "--num-prompts", "--no-compile"):  # fmt: skip
        assert re.search(rf"^  (--\S+ / )?{re.escape(flag)}[ \n]", section, re.M), flag
    assert "--shard " not in section and "--progress" not in section


def test_latent_size_takes_two_numbers(tmp_path):
    bad = tmp_path / "bad.zarr"
    proc = cli("run", "--model-version", "tiny", "--latent-size", "32,32", "--seed", "1",
               "--store", str(bad), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "give H and W as two numbers: --latent-size 32 32" in proc.stderr
    assert "Traceback" not in proc.stderr and not bad.exists()
    good = tmp_path / "good.zarr"
    cli("run", "--model-version", "tiny", "--latent-size", "16", "24", "--num-fid-samples", "1",
        "--num-sampling-steps", "1", "--num-selected-steps", "1", "--store", str(good),
        "--no-progress")  # fmt: skip
    from calibjob.jobs import open_store

    st = open_store(good, mode="r")
    assert st.config.latent_size == (16, 24) and st.root["xs"].shape[2:4] == (16, 24)
