"""The instruction budget of the CUDA kernels, read from the built library by benchmarks/sass_budget.py (no
GPU needed): a change that makes a kernel's inner loop issue more instructions per channel and tap fails
here, before any GPU could show it. The tool's parsing and arithmetic are checked on a fixed listing too,
so that they are tested where no CUDA build or cuobjdump is present."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import elsa_op  # noqa: F401  (registers the operator the library's kernels belong to)

REPO = Path(__file__).resolve().parents[1]

# Instructions per channel and tap of each kernel's inner loop at K = 7 with 16-byte vectors, as the
# sm_80 and sm_90 code of today's kernels has them, plus about 3% (ptxas schedules differ a little from one
# CUDA release to the next). Lower them when a kernel gets faster; never raise one without a reason.
BUDGET = {
    # (arch, kernel, dtype): instructions per channel-tap
    ("sm_90", "forward", "float32"): 3.10,  # today 3.01
    ("sm_90", "forward", "bfloat16"): 3.73,  # today 3.62
    ("sm_90", "grad features", "float32"): 3.20,  # today 3.11
    ("sm_90", "grad features", "bfloat16"): 3.91,  # today 3.80
    ("sm_90", "attn+ghost", "float32"): 6.12,  # today 5.94
    ("sm_90", "attn+ghost", "bfloat16"): 6.53,  # today 6.34
    ("sm_90", "attn+ghost (grad ghost_mul)", "float32"): 9.76,  # today 9.47
    ("sm_90", "attn+ghost (grad ghost_mul)", "bfloat16"): 9.48,  # today 9.20
    ("sm_80", "forward", "float32"): 3.09,  # today 3.00
    ("sm_80", "forward", "bfloat16"): 3.74,  # today 3.63
    ("sm_80", "grad features", "float32"): 3.21,  # today 3.12
    ("sm_80", "grad features", "bfloat16"): 3.94,  # today 3.83
    ("sm_80", "attn+ghost", "float32"): 6.18,  # today 6.00
    ("sm_80", "attn+ghost", "bfloat16"): 6.55,  # today 6.36
    ("sm_80", "attn+ghost (grad ghost_mul)", "float32"): 10.18,  # today 9.88
    ("sm_80", "attn+ghost (grad ghost_mul)", "bfloat16"): 9.50,  # today 9.22
}


def _tool():
    spec = importlib.util.spec_from_file_location("sass_budget", REPO / "benchmarks" / "sass_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def kernels(tool):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("elsa_op::elsa_forward", "CUDA"):
        pytest.skip("elsa_op._C was built without CUDA kernels")
    cuobjdump = tool.find_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the library with")
    return tool.read_kernels(tool.find_library(), ["sm_90", "sm_80"], cuobjdump)


def test_every_kernel_within_its_instruction_budget(kernels):
    counts = {(k.arch, loop.variant, k.dtype): loop for k in kernels if k.K == 7 and k.V > 1 for loop in k.loops}
    assert set(BUDGET) <= set(counts), sorted(set(BUDGET) - set(counts))
    over = {
        key: f"{counts[key].per_ct():.2f} > {budget}" for key, budget in BUDGET.items() if counts[key].per_ct() > budget
    }
    assert not over, f"instructions per channel and tap over budget (benchmarks/sass_budget.py says where): {over}"


def test_the_report_covers_every_kernel_with_registers_and_estimates(kernels, tool):
    text = tool.report(kernels, all_k=False, markdown=False)
    for variant in ("forward", "grad features", "attn+ghost", "attn+ghost (grad ghost_mul)"):
        for dtype in ("float32", "bfloat16"):
            rows = [r for r in text.splitlines() if r.startswith(variant + " ") and f" {dtype} " in r]
            assert rows, f"no {variant} {dtype} row"
    for k in kernels:
        if k.K == 7 and k.V > 1:
            assert k.resources.get("REG", 0) > 0 and k.resources.get("LOCAL", 0) == 0, (k.arch, k.template, k.dtype)
    for device in ("H100 SXM", "H200", "A100 SXM 80GB"):
        assert sum(r.startswith(device) for r in text.splitlines()) == 8, device
    for est in (tool.estimate(d, loop, k.dtype) for d in tool.DEVICES for k in kernels if k.K == 7 for loop in k.loops):
        assert 0 < est.roofline_ms <= est.estimate_ms


LISTING = """
	code for sm_90
		Function : _ZN8elsa_op3gpu12_GLOBAL__N_113gather_kernelIfLi7ELi4ELb0EEEvNS0_10GatherArgsIT_EEi
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0020*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/               @P0 LDG.E.128 R12, desc[UR4][R16.64] ;
        /*0050*/                   FMUL R12, R12, R4 ;
        /*0060*/                   FFMA R20, R8, R12, R20 ;
        /*0070*/                   IADD3 R6, P1, R6, 0x40, RZ ;
        /*0080*/                   IMAD.U32 R9, R9, 0x10000, RZ ;
        /*0090*/                   ISETP.NE.AND P2, PT, R5, RZ, PT ;
        /*00a0*/              @P2 BRA `(.L_x_0) ;
        /*00b0*/                   STG.E.128 desc[UR4][R2.64], R20 ;
.L_x_1:
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA `(.L_x_1) ;
"""


def test_the_tool_reads_a_known_listing(tool):
    """Parsing, loop finding, classes and channel-taps on a fixed sm_90 listing: one loop of 9 instructions
    with one attention load (one tap of V = 4 channels)."""
    functions = tool.parse_sass(LISTING)
    ((name, code),) = functions.items()
    assert len(code) == 14 and code[10].target == 0x20 and code[13].target == 0xC0
    loops = tool.inner_loops(code)
    assert [[i.address for i in body][0] for body in loops] == [0x20, 0xC0]
    (count,) = tool.analyse("gather_kernel", ["float", "7", "4", "false"], loops)
    assert (count.variant, count.instructions, count.channel_taps, count.fp32_pipe) == ("forward", 9, 4, 2)
    assert count.classes == dict(ffma=1, fp=1, cvt=1, ldg=3, stg=0, lds=0, sts=0, int=2, other=1)
    assert count.per_ct() == 2.25
    # The gathers are compiled per combination of ghost kernels: the one with both is counted, not the others.
    assert tool.analyse("gather_kernel", ["float", "7", "4", "false", "true", "true"], loops) == [count]
    assert tool.analyse("gather_kernel", ["float", "7", "4", "false", "false", "true"], loops) == []


def test_the_estimates_arithmetic(tool):
    """Stage 1 is 1.888e9 channel-taps; the forward's compulsory bytes are x, out and the attention once
    (544 MB in float32); an H100's FP32 FMA floor for 2 FMA per channel-tap is 0.113 ms."""
    assert tool.stage1_channel_taps() == 128 * 96 * 56 * 56 * 49
    assert tool.stage1_bytes("forward", "float32") == 4 * (2 * 128 * 96 * 56 * 56 + 128 * 3 * 49 * 56 * 56)
    assert tool.stage1_bytes("forward", "bfloat16") * 2 == tool.stage1_bytes("forward", "float32")
    h100 = next(d for d in tool.DEVICES if d.name == "H100 SXM")
    loop = tool.LoopCount("forward", 64, 16, dict.fromkeys(tool.CLASSES, 0), 32)
    e = tool.estimate(h100, loop, "float32")
    assert e.roofline_ms == pytest.approx(544.3e6 / 3.35e12 * 1e3, rel=1e-3)
    assert e.issue_ms == pytest.approx(4 * 1.888e9 / (132 * 4 * 32 * 1.98e9) * 1e3, rel=1e-3)
    # in bfloat16 the compulsory bytes take 0.081 ms, under the FMA floor: the roofline is arithmetic
    assert tool.estimate(h100, loop, "bfloat16").roofline_ms == pytest.approx(0.113, rel=0.01)


def test_measured_kernel_times_are_read_from_bench_op(tool, tmp_path):
    """gpu_check.sh puts bench_op.py --split's stage-1, channels-last, batch-128 times beside the estimates."""
    log = tmp_path / "bench.log"
    log.write_text(
        "# elsa_op vs unfold, forward+backward, NVIDIA H200, torch 2.11, batch 128, ghost add, median of 5\n"
        "| shape | dtype | layout | kernel | ms | MB moved |\n|---|---|---|---|---|---|\n"
        "| stage1 | float32 | channels_last | forward | 0.512 | 544 |\n"
        "| stage1 | bfloat16 | channels_last | grad attn+ghost | 0.700 | 272 |\n"
        "| stage1 | float32 | nchw | forward | 0.900 | 544 |\n"
        "| stage2 | float32 | channels_last | forward | 0.300 | 272 |\n"
        "# elsa_op vs unfold, forward+backward, NVIDIA H200, torch 2.11, batch 8, ghost add, median of 5\n"
        "| stage1 | float32 | channels_last | grad features | 0.100 | 34 |\n"
    )
    assert tool.measured_times(log) == {("forward", "float32"): 0.512, ("attn+ghost", "bfloat16"): 0.7}
    assert [d.name for d in tool.pick_devices("NVIDIA H200")] == ["H200"]
    assert [d.name for d in tool.pick_devices("NVIDIA H100 80GB HBM3")] == ["H100 SXM"]
    assert len(tool.pick_devices("Stand-in GPU")) == len(tool.DEVICES)
