"""DeepSpeed's compiled ops: built once at install, never compiled by a run, and a build lock left
by a dead process never waited on.

DeepSpeed JIT-builds its C++ ops with torch's extension builder (``torch.utils.cpp_extension.load``)
into ``$TORCH_EXTENSIONS_DIR/<op>/``. On a CPU the one op a run builds is the shared-memory
collective ``deepspeed_shm_comm`` (``ShareMemCommBuilder``), which ``deepspeed.init_distributed``
loads when it creates its communication backend (``build_shm_op`` in ``deepspeed/comm/torch.py``):
about 60 s on 2 cores, again whenever the sources' path (the venv's) changes.

- ``make install`` runs ``python -m engine.runtime.extensions``, which builds that op into the
  venv's ``torch_extensions/``; the commands point ``TORCH_EXTENSIONS_DIR`` there when it is unset
  (:func:`use_venv_extensions_dir`), so no run compiles it (a load only runs ninja's up-to-date
  check, under a second).
- A world of one never needs it: DeepSpeed uses it only in ``inference_all_reduce``, which returns
  at once in a world of one. :func:`skip_shm_op` marks it incompatible in DeepSpeed's table of
  compatible ops (``deepspeed.ops.__compatible_ops__``, probed once per process and kept, edits
  included), which ``build_shm_op`` consults: DeepSpeed then runs on gloo alone, loading nothing.
- The builder's lock: torch's ``FileBaton`` creates ``<op dir>/lock`` (recording no owner), keeps it
  open while it builds or checks the build, and removes it after; a process killed meanwhile
  leaves it, and every later load waits on it with no timeout. :class:`BuildLockWatch` (a thread,
  during DeepSpeed's startup) removes a lock whose owner is gone: no process on this host holds
  it open (``/proc/<pid>/fd``) in two looks at least a second apart. A live owner is waited for,
  with a message naming it. On a network filesystem an owner on another node cannot be seen (nor
  any owner without ``/proc``): there a lock that nobody here holds is reported with its path at
  once and removed after :data:`NETWORK_FS_GRACE_S` seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("engine.runtime.extensions")

#: the op DeepSpeed builds on a CPU (deepspeed/ops/op_builder/cpu/comm.py)
SHM_OP = "deepspeed_shm_comm"
#: a lock no local process holds is removed after this long on a local filesystem ...
LOCAL_GRACE_S = 1.0
#: ... and after this long on a network filesystem, where another node may be building
NETWORK_FS_GRACE_S = 300.0
_NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "cifs",
    "smb3",
    "smbfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "afs",
    "panfs",
    "wekafs",
}


def extensions_root() -> Path:
    """Where torch builds extensions: ``$TORCH_EXTENSIONS_DIR``, else its default
    (``~/.cache/torch_extensions/py<XY>_<accelerator>``)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def use_venv_extensions_dir() -> None:
    """Point ``TORCH_EXTENSIONS_DIR`` at the venv's ``torch_extensions/`` (where ``make install``
    built the ops) when it is unset and this interpreter runs in a writable venv."""
    if os.environ.get("TORCH_EXTENSIONS_DIR") or sys.prefix == sys.base_prefix:
        return
    if os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def _cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def skip_shm_op() -> None:
    """Tell DeepSpeed not to load its shared-memory op (a world of one on a CPU: it is never
    used there); call it before ``deepspeed.init_distributed``."""
    if not _cpu_accelerator():
        return  # GPU accelerators have no such op (and probing their table costs seconds)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def build_cpu_ops() -> list[str]:
    """Build (or find up to date) the ops a CPU run loads: what ``make install`` calls. Returns
    the names loaded (none on a GPU machine, whose ops are not this module's concern)."""
    use_venv_extensions_dir()
    if not _cpu_accelerator():
        return []
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return []
    with BuildLockWatch():
        builder.load(verbose=False)
    return [builder.name]


# ---- the builder's lock -------------------------------------------------------------------------


def lock_holders(path: Path) -> list[int]:
    """The processes on this host that hold ``path`` open (those whose ``/proc/<pid>/fd`` this
    user may read)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return []
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in os.scandir(fd_dir):
                try:
                    info = os.stat(fd.path)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                    holders.append(int(fd_dir.parent.name))
                    break
        except OSError:  # gone, or another user's
            continue
    return holders


def on_network_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a network filesystem (from ``/proc/mounts``)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    resolved, best, kind = str(path.resolve()), "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(
            best
        ):
            best, kind = point, fields[2]
    return kind in _NETWORK_FILESYSTEMS


class BuildLockWatch:
    """While active (a context manager), clears torch extension build locks whose owner is gone
    (module docstring), so that a load waiting on one goes on within seconds. One look at entry,
    then one every ``interval`` seconds in a daemon thread; nothing is read while no lock exists.

    Args:
        root: the extensions directory (default :func:`extensions_root`).
        interval: seconds between looks.
    """

    def __init__(self, root: Path | None = None, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.removed: list[Path] = []
        self._orphans: dict[tuple[int, int], float] = {}  # lock (dev, inode) -> first seen
        self._told: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BuildLockWatch:
        self.root = self.root or extensions_root()
        self.look()
        self._thread = threading.Thread(target=self._watch, name="build-lock-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.look()

    def look(self) -> None:
        """One look at every ``<root>/*/lock``: remove those whose owner is gone."""
        now = time.monotonic()
        for lock in Path(self.root).glob("*/lock"):
            try:
                info = lock.stat()
            except FileNotFoundError:
                continue
            key = (info.st_dev, info.st_ino)
            holders = lock_holders(lock)
            if holders:
                self._orphans.pop(key, None)
                if key not in self._told and holders != [os.getpid()]:  # not our own build
                    self._told.add(key)
                    log.info("waiting for process %s, which builds %s", holders[0], lock.parent)
                continue
            first_seen = self._orphans.setdefault(key, now)
            # a holder elsewhere (another node), or none visible here (no /proc): wait longer
            network = on_network_filesystem(lock) or not Path("/proc/self/fd").is_dir()
            grace = NETWORK_FS_GRACE_S if network else LOCAL_GRACE_S
            if now - first_seen >= grace:
                self._remove(lock, key, network)
            elif network and key not in self._told:
                self._told.add(key)
                log.warning(
                    "build lock %s is held by no process seen on this host; another node (a "
                    "network filesystem) may be building: removed in %.0f s unless it goes "
                    "(delete it by hand if nothing builds)",
                    lock,
                    grace,
                )

    def _remove(self, lock: Path, key: tuple[int, int], network: bool) -> None:
        try:
            info = lock.stat()
            if (info.st_dev, info.st_ino) != key:
                return  # released and taken again meanwhile: a live lock
            lock.unlink()
        except FileNotFoundError:
            return
        self._orphans.pop(key, None)
        self.removed.append(lock)
        log.warning(
            "removed the stale build lock %s: no process on this host holds it (%s), so the "
            "process that took it died during a build; the build is checked again now",
            lock,
            "for the whole grace time on a network filesystem" if network else "twice",
        )


def main() -> int:
    """``python -m engine.runtime.extensions``: build the ops a CPU run loads (``make install``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    built = build_cpu_ops()
    where = os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_root()
    print(
        f"DeepSpeed ops ready in {where}: {', '.join(built) or 'none needed'} "
        f"({time.time() - started:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
