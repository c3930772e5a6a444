"""engine.runtime.machine.machine_info: what results.json and the task cache record about the
machine (numbers differ between CPUs, so tables say where they came from)."""

from __future__ import annotations

import torch

from engine.runtime import machine
from engine.runtime.machine import machine_info

KEYS = {"cpu", "cpu_id", "arch", "cores", "torch_threads", "cpu_capability", "cpu_flags"}


def test_this_machine_is_described():
    info = machine_info()
    assert KEYS | {"torch", "gpu"} == set(info)
    assert info["cpu"] and info["cpu"] != "unknown"
    assert info["cores"] >= 1 and info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch"] == torch.__version__
    assert set(info["cpu_flags"]) <= machine.KERNEL_FLAGS
    assert info["cpu_flags"] == sorted(info["cpu_flags"])


X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_x86_and_arm_cpuinfo(monkeypatch, tmp_path):
    for text, cpu, cpu_id, flags in (
        (
            X86,
            "AMD EPYC",
            "AuthenticAMD family 25 model 17 stepping 1",
            ["avx2", "avx512_bf16", "avx512f", "fma"],
        ),
        (ARM, "implementer 0x41 part 0xd40", None, ["asimd", "bf16", "i8mm", "sve"]),
    ):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(machine, "Path", lambda _: tmp_path / "cpuinfo")
        info = machine_info()
        assert cpu in info["cpu"] and info["cpu_id"] == cpu_id
        assert info["cpu_flags"] == flags


def test_without_cpuinfo_the_platform_answers(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "Path", lambda _: tmp_path / "missing")
    info = machine_info()
    assert info["cpu"] and info["cpu_id"] is None and info["cpu_flags"] == []
