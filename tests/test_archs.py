"""The CUDA arch policy of the build and the check each GPU gets before its first launch (elsa_op/_archs.py),
on every case, without a GPU."""

import pytest
import torch

import elsa_op._registration as registration
from elsa_op._archs import arch_list, built_archs, cuda_arch_error, runs_on, torch_mismatch

TORCH_CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()


def test_the_environment_always_wins():
    assert arch_list("8.6", [(9, 0)], TORCH_CU130) == "8.6"
    assert arch_list("8.0;9.0+PTX", [], TORCH_CU130) == "8.0;9.0+PTX"


def test_with_gpus_torch_builds_for_them():
    assert arch_list(None, [(8, 6), (12, 0)], TORCH_CU130) is None
    assert arch_list(" ", [(8, 6)], TORCH_CU130) is None


def test_without_gpus_the_archs_torch_ships_plus_ptx_for_the_newest():
    assert arch_list(None, [], TORCH_CU130) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert arch_list("", [], ["sm_90", "sm_80", "compute_90", "sm_80"]) == "8.0;9.0+PTX"


def test_without_gpus_only_the_archs_the_compiler_knows():
    nvcc_12_6 = ["compute_50", "compute_75", "compute_80", "compute_86", "compute_89", "compute_90", "compute_90a"]
    assert arch_list(None, [], TORCH_CU130, nvcc_12_6) == "7.5;8.0;8.6;9.0+PTX"
    assert arch_list("12.0", [], TORCH_CU130, nvcc_12_6) == "12.0"  # asked for: nvcc says what it refuses
    with pytest.raises(ValueError, match="set TORCH_CUDA_ARCH_LIST"):
        arch_list(None, [], ["sm_100"], nvcc_12_6)


def test_without_gpus_or_torch_archs_the_error_says_what_to_set():
    with pytest.raises(ValueError, match="set TORCH_CUDA_ARCH_LIST"):
        arch_list(None, [], [])


def test_built_archs_reads_nvcc_gencode_flags():
    flags = [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=[sm_100,compute_100]",
    ]
    assert built_archs(flags) == ["sm_75", "compute_90", "sm_90", "compute_100", "sm_100"]


FULL = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CI = ["sm_75", "sm_80", "compute_90", "sm_90"]


@pytest.mark.parametrize(
    "built, capability, runs",
    [
        # The full list of a wheel: every GPU torch supports, and newer ones through PTX.
        *((FULL, cap, True) for cap in [(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3)]),
        *((FULL, cap, True) for cap in [(12, 0), (12, 1), (13, 0)]),
        *((FULL, cap, False) for cap in [(7, 0), (7, 2), (6, 1), (5, 0)]),
        # CI's list: PTX of 9.0 reaches every later GPU; SASS stays within its major.
        *((CI, cap, True) for cap in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]),
        (CI, (7, 0), False),
        # SASS only: nothing reaches a newer major.
        (["sm_80", "sm_90"], (8, 9), True),
        (["sm_80", "sm_90"], (12, 0), False),
        (["sm_80", "sm_90"], (10, 0), False),
        (["sm_86"], (8, 0), False),
        # PTX never reaches an older GPU.
        (["compute_90"], (8, 9), False),
        # Arch-specific code runs on its exact capability only.
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),
        (["compute_100a"], (12, 0), False),
        ([], (9, 0), False),
    ],
)
def test_which_gpus_can_run_what_was_built(built, capability, runs):
    error = cuda_arch_error(built, capability, "NVIDIA Some GPU")
    assert (error is None) == runs, error
    if not runs:
        major, minor = capability
        assert "\n" not in error
        assert f"NVIDIA Some GPU (sm_{major}{minor})" in error
        assert (", ".join(built) or "no GPU") in error
        assert f"`TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation -e .`" in error


def test_the_error_of_an_sm80_sm90_library_on_an_rtx_5090():
    assert cuda_arch_error(["sm_80", "sm_90"], (12, 0), "NVIDIA GeForce RTX 5090") == (
        "elsa_op cannot run on this GPU, NVIDIA GeForce RTX 5090 (sm_120): elsa_op._C has code for sm_80, sm_90 "
        "only; rebuild it for this GPU with `TORCH_CUDA_ARCH_LIST=12.0 pip install --no-build-isolation -e .` "
        "from the source tree"
    )


def test_a_malformed_arch_is_refused():
    with pytest.raises(ValueError, match="not a CUDA arch: '8.0'"):
        runs_on("8.0", (8, 0))


def test_the_check_the_cuda_kernels_call_goes_through_the_dispatcher(monkeypatch):
    """The CUDA kernels call elsa_op::check_cuda_arch through the dispatcher before their first launch on a
    device; here it is called the same way, with a stand-in GPU."""
    monkeypatch.setattr(registration, "built_cuda_archs", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU {device}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    with pytest.raises(RuntimeError, match=r"^elsa_op cannot run on this GPU, GPU 1 \(sm_120\)"):
        torch.ops.elsa_op.check_cuda_arch(1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 9))
    torch.ops.elsa_op.check_cuda_arch(1)


def test_the_library_records_its_archs():
    recorded = registration.built_cuda_archs()
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("elsa_op::elsa_forward", "CUDA")
    assert bool(recorded) == cuda_kernels
    for arch in recorded:
        runs_on(arch, (8, 0))  # a well-formed arch, or ValueError


def test_a_wheel_refuses_another_torch_minor_in_one_line():
    requires = ["torch==2.14.*", "torchvision", "mmcv==2.1.0; extra == 'mm'"]
    assert torch_mismatch(requires, "2.14.1+cu130") is None
    assert torch_mismatch(requires, "2.14.0") is None
    error = torch_mismatch(requires, "2.15.0+cu130")
    assert error is not None and "\n" not in error
    assert error.startswith("this elsa-vision wheel was built for torch 2.14, but torch 2.15.0+cu130 is installed")
    # A source install, whose requirement is a range, is not checked here.
    assert torch_mismatch(["torch>=2.6"], "2.15.0") is None
