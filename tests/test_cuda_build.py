"""The compiled CUDA kernels, read from the built library (no GPU needed): it has code for the archs of the
build's policy and records them, every kernel of elsa_op/csrc/cuda has code for sm_80 and sm_90, and none
spills registers to local memory."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import elsa_op

REPO = Path(__file__).resolve().parents[1]


def cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit, else the copy triton ships."""
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("cuobjdump") or next(
        (
            str(p)
            for p in (
                Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "cuobjdump",
                Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump",
            )
            if p.exists()
        ),
        None,
    )
    if found is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the library with")
    return found


needs_cuda_build = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("elsa_op::elsa_forward", "CUDA"),
    reason="elsa_op._C was built without CUDA kernels",
)


def library() -> Path:
    return next(Path(elsa_op.__file__).parent.glob("_C*.so"))


@needs_cuda_build
def test_the_library_has_the_archs_of_the_policy_and_records_them(monkeypatch):
    """cuobjdump's lists of SASS (ELF) and PTX in the library, against the archs that setup.py's policy picks
    in this environment (the tests run where the library was built, e.g. CI's TORCH_CUDA_ARCH_LIST) and
    against the list the library records for its run-time check."""
    from torch.utils.cpp_extension import CUDA_HOME, _get_cuda_arch_flags

    from elsa_op._archs import built_archs, environment_arch_list
    from elsa_op._registration import built_cuda_archs

    found = set()
    for kind, prefix in (("elf", "sm"), ("ptx", "compute")):
        out = subprocess.run(
            [cuobjdump(), f"--list-{kind}", str(library())], capture_output=True, text=True, check=True
        ).stdout
        found |= {
            f"{prefix}_{arch}" for arch in re.findall(rf"\.sm_(\d+[af]?)\.{'cubin' if kind == 'elf' else 'ptx'}", out)
        }
    chosen = environment_arch_list(torch, CUDA_HOME)
    if chosen is not None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", chosen)
    policy = set(built_archs(_get_cuda_arch_flags()))
    assert found == policy, f"the library has {sorted(found)}, the policy builds {sorted(policy)} here"
    assert set(built_cuda_archs()) == found
    if chosen is None or "PTX" in chosen:  # the policy's lists, and torch's own default, add PTX
        assert any(a.startswith("compute_") for a in found), "no PTX: no newer GPU could run the library"


@needs_cuda_build
def test_every_cuda_kernel_has_sm80_and_sm90_code_and_no_spills():
    library_path = library()
    dump = subprocess.run(
        [cuobjdump(), "--dump-resource-usage", str(library_path)], capture_output=True, text=True, check=True
    ).stdout
    kernels = set()
    for source in (REPO / "elsa_op" / "csrc" / "cuda").glob("*.cu"):
        kernels |= set(
            re.findall(
                r"__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)",
                source.read_text(),
            )
        )
    assert kernels
    found = {}  # (arch, kernel) -> resource lines
    arch = None
    lines = dump.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"arch = (sm_\d+)", line.strip()):
            arch = m.group(1)
        if m := re.match(r"\s*Function (\S+):", line):
            name = next((k for k in kernels if re.search(rf"\d{{1,3}}{k}I", m.group(1))), None)
            if name is not None:
                found.setdefault((arch, name), []).append(lines[i + 1])
    # The archs the register budgets were made for; a build for one GPU holds one of them, or none.
    archs = [arch for arch in ("sm_80", "sm_90") if arch in {a for a, _ in found}]
    if not archs:
        pytest.skip("the library holds neither sm_80 nor sm_90 code (TORCH_CUDA_ARCH_LIST or the GPU chose)")
    for arch in archs:
        for kernel in sorted(kernels):
            usages = found.get((arch, kernel))
            assert usages, f"{kernel} has no {arch} code"
            for usage in usages:
                stack, local = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("STACK", "LOCAL"))
                assert stack == 0 and local == 0, f"{kernel} ({arch}) spills: {usage.strip()}"
