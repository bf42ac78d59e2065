"""The GPU architectures of ``elsa_op._C``: which ones a build targets, and whether a GPU can run them.

Pure functions of their arguments, and :func:`environment_arch_list`, which reads those arguments from the
build's environment for ``setup.py`` and the tests. ``setup.py`` loads this file by its path at build time (it needs
nothing but the standard library); at run time ``elsa_op`` checks each GPU once, before the first kernel
launch on it, with :func:`cuda_arch_error`.

An arch is written as the CUDA toolkit writes it: ``sm_86`` is machine code (SASS) for compute capability
8.6, ``compute_90`` is PTX for 9.0, which the driver compiles for the GPU when the library is loaded.
"""

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

REBUILD = "pip install --no-build-isolation -e ."

_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def arch_list(
    requested: str | None,
    gpu_capabilities: Sequence[tuple[int, int]],
    torch_archs: Iterable[str],
    compiler_archs: Iterable[str] | None = None,
) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` that a build of ``elsa_op._C`` uses.

    Args:
        requested: the ``TORCH_CUDA_ARCH_LIST`` of the environment; when set, it always wins.
        gpu_capabilities: the compute capabilities of the GPUs of the building machine.
        torch_archs: the archs the installed torch ships (``torch._C._cuda_getArchFlags().split()``).
        compiler_archs: the archs nvcc can build (``nvcc --list-gpu-arch``), when known: an older toolkit
            than torch's builds only the archs of torch's that it knows. Default: all of torch's.

    Returns:
        str | None: ``requested`` when set; ``None`` on a machine with GPUs, for torch's own default (the
        archs of those GPUs, PTX for the newest); otherwise the archs torch ships plus PTX for the newest,
        e.g. ``"7.5;8.0;8.6;9.0;10.0;12.0+PTX"``, so that the library runs wherever torch runs.
    """
    if requested and requested.strip():
        return requested
    if gpu_capabilities:
        return None
    machine = sorted({int(m.group(2)) for a in torch_archs if (m := _ARCH.fullmatch(a)) and m.group(1) == "sm"})
    if compiler_archs is not None:
        known = {int(m.group(2)) for a in compiler_archs if (m := _ARCH.fullmatch(a.strip()))}
        machine = [v for v in machine if v in known]
    if not machine:
        raise ValueError(
            "cannot choose the CUDA archs to build: no GPU is visible and torch ships no CUDA archs that nvcc "
            "builds (a CPU build of torch?); set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST=8.0"
        )
    return ";".join(f"{v // 10}.{v % 10}" for v in machine) + "+PTX"


def environment_arch_list(torch: Any, cuda_home: str | None) -> str | None:
    """:func:`arch_list` for this environment: its ``TORCH_CUDA_ARCH_LIST``, the GPUs ``torch`` sees, the
    archs it ships and those that ``nvcc`` under ``cuda_home`` (else on PATH) builds."""
    gpus = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    shipped = (getattr(torch._C, "_cuda_getArchFlags", lambda: None)() or "").split()
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else "nvcc"
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    return arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), gpus, shipped, listed or None)


def built_archs(gencode_flags: Iterable[str]) -> list[str]:
    """The archs that nvcc's ``-gencode`` flags build: ``code=sm_80`` gives ``sm_80``, ``code=compute_90``
    gives ``compute_90`` (what ``cuobjdump --list-elf`` / ``--list-ptx`` then find in the library), sorted."""
    found: set[str] = set()
    for flag in gencode_flags:
        if m := re.search(r",code=\[?([\w,]+)\]?", flag):
            found.update(code for code in m.group(1).split(",") if _ARCH.fullmatch(code))
    return sorted(found, key=_sort_key)


def _sort_key(arch: str) -> tuple[int, str]:
    m = _ARCH.fullmatch(arch)
    assert m is not None
    return int(m.group(2)), arch


def runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code for ``arch`` runs on a GPU of compute ``capability`` (major, minor).

    SASS runs on the same major with a minor at least its own (sm_80 on 8.0, 8.6, 8.9); PTX on any
    capability at least its own, compiled by the driver. Arch-specific code (``sm_90a``, ``sm_100f``,
    ``compute_90a``) is taken to run on its exact capability only.
    """
    m = _ARCH.fullmatch(arch)
    if m is None:
        raise ValueError(f"not a CUDA arch: {arch!r} (expected e.g. sm_80 or compute_90)")
    kind, number, suffix = m.group(1), int(m.group(2)), m.group(3)
    major, minor = number // 10, number % 10
    if suffix:
        return (major, minor) == capability
    if kind == "sm":
        return major == capability[0] and minor <= capability[1]
    return (major, minor) <= capability


def cuda_arch_error(built: Sequence[str], capability: tuple[int, int], gpu_name: str) -> str | None:
    """``None`` when one of the ``built`` archs runs on this GPU, else the one-line error to raise.

    The error names the GPU, its arch, the archs built and the command that rebuilds the library for it.
    """
    if any(runs_on(arch, capability) for arch in built):
        return None
    major, minor = capability
    return (
        f"elsa_op cannot run on this GPU, {gpu_name} (sm_{major}{minor}): elsa_op._C has code for "
        f"{', '.join(built) or 'no GPU'} only; rebuild it for this GPU with "
        f"`TORCH_CUDA_ARCH_LIST={major}.{minor} {REBUILD}` from the source tree"
    )


def torch_mismatch(requires: Iterable[str], torch_version: str) -> str | None:
    """``None`` when the torch of a wheel's requirements (``torch==2.14.*``) is the running one, else the
    one-line error to raise before loading a library built against another torch's ABI."""
    running = ".".join(torch_version.split(".")[:2])
    for requirement in requires:
        m = re.fullmatch(r"torch\s*==\s*(\d+\.\d+)\.\*", requirement.split(";")[0].strip())
        if m and m.group(1) != running:
            return (
                f"this elsa-vision wheel was built for torch {m.group(1)}, but torch {torch_version} is installed: "
                f"install the elsa-vision wheel built for torch {running}, or torch {m.group(1)}, or build from "
                f"source (`{REBUILD}` in the source tree)"
            )
    return None
