"""Run `calibjob` with a fault injected in-process, where only timing could reach it:

    python tests/faults.py [--slow-fsync S] [--slow-load S] [--load-fails] [--slow-link S]
                           [--log-units FILE] -- calibjob arguments...

--slow-fsync S   every fsync of a store file or a merge output waits S seconds first (a slow disk)
--slow-load S    loading the model waits S seconds first (a large checkpoint)
--load-fails     loading the model raises ModelUnavailable (a machine without the weights)
--fail-when F    with --load-fails: raise only once file F exists (the test picks the moment)
--slow-link S    merge's final link/rename of its output waits S seconds first
--log-units F    append 'pid trajectories' to F each time the engine finishes computing a unit
                 ('pid uN' for unit N of a profile job)
--slow-rmtree S  a folder removed under a store's progress/ waits S seconds after its removal
--sigint-at-exit  as the process exits (its command done), it gets SIGINT (a late Ctrl-C)
--hold-second-unit F  the engine's second unit in this process waits until file F exists
                 (holding its lease: the test decides when it may finish)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def install(a: argparse.Namespace) -> None:
    import calibjob.jobs.run as worker

    if a.slow_fsync:
        orig_fsync = os.fsync

        def slow_fsync(fd):
            time.sleep(a.slow_fsync)
            return orig_fsync(fd)

        os.fsync = slow_fsync  # store.py and merge.py call os.fsync at use time
    if a.slow_load or a.load_fails:
        orig_load = worker._load_model

        def load(cfg, **kw):
            time.sleep(a.slow_load)
            deadline = time.monotonic() + 120
            while a.fail_when and not os.path.exists(a.fail_when) and time.monotonic() < deadline:
                time.sleep(0.01)
            if a.load_fails:
                from calibjob.errors import ModelUnavailable

                raise ModelUnavailable("cannot load the MMDiT (injected: no weights here)")
            return orig_load(cfg, **kw)

        worker._load_model = load
    if a.slow_link:
        orig_link, orig_replace = os.link, os.replace

        def slow_link(src, dst, *args, **kw):
            if ".partial" in str(src) and ".npz" in str(dst):
                time.sleep(a.slow_link)
            return orig_link(src, dst, *args, **kw)

        def slow_replace(src, dst, *args, **kw):
            if ".partial" in str(src) and ".npz" in str(dst):
                time.sleep(a.slow_link)
            return orig_replace(src, dst, *args, **kw)

        os.link, os.replace = slow_link, slow_replace
    if a.slow_rmtree:
        import shutil

        orig_rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kw):
            out = orig_rmtree(path, *args, **kw)
            if "/progress/" in str(path):
                time.sleep(a.slow_rmtree)
            return out

        shutil.rmtree = slow_rmtree  # Zarr's LocalStore removes a folder with shutil.rmtree
    if a.sigint_at_exit:
        import atexit
        import signal

        def late_ctrl_c() -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal is delivered and handled (or ignored) by now

        atexit.register(late_ctrl_c)
    if a.hold_second_unit:
        import calibjob.engine as engine

        orig_hold = engine.Engine.run_unit
        calls = []

        def held(self, *args, **kw):
            calls.append(1)
            if len(calls) == 2:
                while not os.path.exists(a.hold_second_unit):
                    time.sleep(0.01)
            return orig_hold(self, *args, **kw)

        engine.Engine.run_unit = held
    if a.log_units:
        import calibjob.engine as engine

        orig_run = engine.Engine.run_unit

        def run_unit(self, prompt, trajectories, *args, **kw):
            res = orig_run(self, prompt, trajectories, *args, **kw)
            with open(a.log_units, "a") as f:
                f.write(f"{os.getpid()} {','.join(map(str, trajectories))}\n")
            return res

        engine.Engine.run_unit = run_unit
        import calibjob.profile.forward as forward

        orig_profile = forward.Profiler.run_unit

        def profile_unit(self, unit, *args, **kw):
            res = orig_profile(self, unit, *args, **kw)
            with open(a.log_units, "a") as f:
                f.write(f"{os.getpid()} u{unit.index}\n")
            return res

        forward.Profiler.run_unit = profile_unit


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--slow-fsync", type=float, default=0.0)
    p.add_argument("--slow-load", type=float, default=0.0)
    p.add_argument("--load-fails", action="store_true")
    p.add_argument("--fail-when")
    p.add_argument("--slow-link", type=float, default=0.0)
    p.add_argument("--log-units")
    p.add_argument("--slow-rmtree", type=float, default=0.0)
    p.add_argument("--hold-second-unit")
    p.add_argument("--sigint-at-exit", action="store_true")
    a = p.parse_args(argv[:cut])
    from calibjob.core import interrupts

    interrupts.install()
    install(a)
    sys.argv = ["calibjob", *argv[cut + 1 :]]
    from calibjob.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
