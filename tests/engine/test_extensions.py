"""DeepSpeed's compiled ops (engine/runtime/extensions.py): a build lock whose owner died is
cleared within seconds (torch's own wait then goes on), one held by a live process is waited
for, and a world of one needs no op. The real processes and torch's real ``FileBaton`` are used;
the only waits are for the watch's grace time to pass."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.runtime.extensions import (
    LOCAL_GRACE_S,
    SHM_OP,
    BuildLockWatch,
    extensions_root,
    lock_holders,
    on_network_filesystem,
    skip_shm_op,
)

HOLD = (
    "import os, sys, time\n"
    "os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)  # as torch's FileBaton.try_acquire\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def test_a_stale_lock_is_cleared_and_torchs_wait_goes_on(tmp_path, caplog):
    from torch.utils.file_baton import FileBaton

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # left by a process killed during a build: nobody holds it
    assert lock_holders(lock) == [] and not on_network_filesystem(lock)
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (FileBaton(str(lock)).wait(), waited.set()))
    with caplog.at_level(logging.WARNING), BuildLockWatch(tmp_path, interval=0.1) as watch:
        waiter.start()  # torch's own wait, which has no timeout
        wait_until(waited.is_set, "torch's wait on the stale lock ending")
    waiter.join()
    assert watch.removed == [lock] and not lock.exists()
    assert f"removed the stale build lock {lock}" in caplog.text


def test_a_lock_held_by_a_live_build_is_waited_for(tmp_path, caplog):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holders(lock) == [holder.pid]
        watch = BuildLockWatch(tmp_path)
        watch.root = tmp_path
        with caplog.at_level(logging.INFO):
            for _ in range(3):  # looks spanning more than the grace time: the owner is alive
                watch.look()
                time.sleep(LOCAL_GRACE_S * 0.6)
        assert lock.exists() and watch.removed == []
        assert f"waiting for process {holder.pid}, which builds {lock.parent}" in caplog.text
        holder.send_signal(signal.SIGKILL)  # killed mid-build: the lock stays behind
        holder.wait()
        assert lock.exists() and lock_holders(lock) == []
        with BuildLockWatch(tmp_path, interval=0.1):
            wait_until(lambda: not lock.exists(), "the dead build's lock being cleared")
    finally:
        holder.kill()
        holder.wait()


def test_a_world_of_one_loads_no_shared_memory_op(tmp_path, monkeypatch):
    """DeepSpeed's own loader (build_shm_op, what init_distributed calls) returns no op once
    skip_shm_op has run: nothing is built, loaded or locked."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    compatible = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(compatible, SHM_OP, compatible.get(SHM_OP, False))
    skip_shm_op()
    assert build_shm_op() is None
    assert list(tmp_path.iterdir()) == []


def _built_shm_op() -> Path | None:
    """The op's build directory for this venv's DeepSpeed sources (``make install`` builds it),
    or None."""
    import deepspeed

    from engine.runtime.extensions import use_venv_extensions_dir

    use_venv_extensions_dir()
    built = extensions_root() / SHM_OP
    ninja = built / "build.ninja"
    sources = str(Path(deepspeed.__file__).parent)
    if (built / f"{SHM_OP}.so").is_file() and ninja.is_file() and sources in ninja.read_text():
        return built
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_start_past_a_stale_lock_on_the_prebuilt_op(tmp_path, cli, runs, pair_files):
    """torchrun with two processes loads the op, from a copy of the prebuilt one with a lock left
    in it: the run removes the lock and trains (it waited forever before)."""
    built = _built_shm_op()
    if built is None:
        pytest.skip(f"{SHM_OP} is not built for this venv (make install builds it)")
    root = tmp_path / "torch_extensions"
    shutil.copytree(built, root / SHM_OP, ignore=shutil.ignore_patterns("lock"))
    (root / SHM_OP / "lock").touch()
    overrides = [
        *runs.distributed_overrides(pair_files, 2, "zero0"),
        f"output_dir={tmp_path / 'run'}",
    ]
    done = cli.run(overrides, cwd=tmp_path, nproc=2, env={"TORCH_EXTENSIONS_DIR": str(root)})
    assert done.returncode == 0, cli.describe(done)  # torch alone would wait forever (cli: 300 s)
    assert not (root / SHM_OP / "lock").exists()  # removed by a rank's watch (rank 1 logs nothing)
