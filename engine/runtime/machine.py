"""What machine a run ran on, for ``results.json`` and the task cache's summary: numbers from
different CPUs differ (float kernels differ by instruction set, and greedy decoding or a training
run turns last-bit differences into other tokens and other checkpoints), so tables record where
they came from.

Cost: reads ``/proc/cpuinfo`` once per call (Linux; elsewhere ``platform``'s answer).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info"]

#: instruction-set flags that change which float kernels run (x86: torch's and oneDNN's vector
#: widths, bitsandbytes' bf16 4-bit layout; ARM: NEON / SVE, bf16)
KERNEL_FLAGS = frozenset(
    {
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "avx512_fp16",
        "amx_bf16",
        "amx_tile",
        "asimd",
        "sve",
        "sve2",
        "bf16",
        "i8mm",
    }
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _cpu_model(info: dict[str, str]) -> str:
    """The CPU's model name (x86: ``model name``; ARM has none: implementer and part numbers)."""
    if info.get("model name"):
        return info["model name"]
    if info.get("CPU implementer"):
        implementer, part = info["CPU implementer"], info.get("CPU part")
        return f"{platform.machine()} implementer {implementer} part {part}"
    return platform.processor() or platform.machine() or "unknown"


def cpu_name() -> str:
    """This machine's CPU model name (see :func:`machine_info`'s ``cpu``), for report headers."""
    return _cpu_model(_cpuinfo())


def _cpu_id(info: dict[str, str]) -> str | None:
    """Vendor, family, model and stepping (x86): a VM's model name can be as bare as "AMD EPYC",
    which does not tell one generation (and its instruction set) from another."""
    if not info.get("vendor_id"):
        return None
    family, model, stepping = (info.get(k) for k in ("cpu family", "model", "stepping"))
    return f"{info['vendor_id']} family {family} model {model} stepping {stepping}"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine_info() -> dict[str, Any]:
    """``cpu`` (model name), ``cpu_id`` (vendor, family, model, stepping; x86), ``arch``,
    ``cores`` (usable by this process), ``torch_threads``, ``cpu_capability`` (the vector ISA
    torch's CPU kernels dispatch to, e.g. AVX512, AVX2, NEON), ``cpu_flags`` (those of
    :data:`KERNEL_FLAGS` the CPU has), ``torch`` (version) and ``gpu`` (CUDA device 0's name, or
    None)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "cpu": _cpu_model(info),
        "cpu_id": _cpu_id(info),
        "arch": platform.machine(),
        "cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(flags & KERNEL_FLAGS),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
