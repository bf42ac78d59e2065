"""The instruction budget of the CUDA kernels, read from the built library by benchmarks/sass_budget.py (no
GPU needed): a change that makes a kernel issue more instructions per channel and tap, in its inner loop or
over its whole grid as ELSA-Swin-T's stage 1 runs it, fails here before any GPU could show it. The tool's
parsing, control flow and arithmetic are checked on a fixed listing too, so that they are tested where no
CUDA build or cuobjdump is present."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from op_cases import ODD_CHUNK_CASES

import elsa_op  # noqa: F401  (registers the operator the library's kernels belong to)

REPO = Path(__file__).resolve().parents[1]

# Instructions per channel and tap of each kernel's inner loop at K = 7 with 16-byte vectors, as the
# sm_80 and sm_90 code of today's kernels has them, plus about 3% (ptxas schedules differ a little from one
# CUDA release to the next). Lower them when a kernel gets faster; never raise one without a reason.
# (The fused pass's products loop rose by 0.2-0.4 when a pair's weighted sum moved to a padded slot, so that
# the attention gradient's sums read shared memory without bank conflicts: the whole kernel fell by 10-12%.)
BUDGET = {
    # (arch, kernel, dtype): instructions per channel-tap
    ("sm_90", "forward", "float32"): 3.10,  # today 3.01
    ("sm_90", "forward", "bfloat16"): 3.73,  # today 3.62
    ("sm_90", "grad features", "float32"): 3.20,  # today 3.11
    ("sm_90", "grad features", "bfloat16"): 3.91,  # today 3.80
    ("sm_90", "attn+ghost", "float32"): 6.5,  # today 6.31
    ("sm_90", "attn+ghost", "bfloat16"): 6.76,  # today 6.56
    ("sm_90", "attn+ghost (grad ghost_mul)", "float32"): 10.14,  # today 9.84
    ("sm_90", "attn+ghost (grad ghost_mul)", "bfloat16"): 9.69,  # today 9.42
    ("sm_80", "forward", "float32"): 3.09,  # today 3.00
    ("sm_80", "forward", "bfloat16"): 3.74,  # today 3.63
    ("sm_80", "grad features", "float32"): 3.21,  # today 3.12
    ("sm_80", "grad features", "bfloat16"): 3.94,  # today 3.83
    ("sm_80", "attn+ghost", "float32"): 6.38,  # today 6.19
    ("sm_80", "attn+ghost", "bfloat16"): 6.61,  # today 6.42
    ("sm_80", "attn+ghost (grad ghost_mul)", "float32"): 10.1,  # today 9.81
    ("sm_80", "attn+ghost (grad ghost_mul)", "bfloat16"): 9.56,  # today 9.28
}

# Instructions per channel and tap of the whole kernels (every warp of the grid: set-up, the border path,
# warps that run both paths, idle lanes, every step and barrier of the fused pass, the stores) at
# ELSA-Swin-T stage 1, batch 128, as sass_budget.py models them, plus about 3%.
WHOLE_BUDGET = {
    ("sm_90", "forward", "float32"): 5.22,  # today 5.07
    ("sm_90", "forward", "bfloat16"): 6.43,  # today 6.24
    ("sm_90", "grad features", "float32"): 5.98,  # today 5.81
    ("sm_90", "grad features", "bfloat16"): 8.58,  # today 8.33
    ("sm_90", "attn+ghost", "float32"): 13.97,  # today 13.56
    ("sm_90", "attn+ghost", "bfloat16"): 14.2,  # today 13.79
    ("sm_80", "forward", "float32"): 5.11,  # today 4.96
    ("sm_80", "forward", "bfloat16"): 6.30,  # today 6.12
    ("sm_80", "grad features", "float32"): 5.81,  # today 5.64
    ("sm_80", "grad features", "bfloat16"): 8.18,  # today 7.94
    ("sm_80", "attn+ghost", "float32"): 13.48,  # today 13.09
    ("sm_80", "attn+ghost", "bfloat16"): 13.71,  # today 13.31
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
    library = tool.find_library()
    return tool.read_kernels(library, tool.library_archs(library, cuobjdump), cuobjdump)


def test_every_kernel_within_its_instruction_budget(kernels):
    counts = {(k.arch, loop.variant, k.dtype): loop for k in kernels if k.K == 7 and k.V > 1 for loop in k.loops}
    # every budgeted kernel of every budgeted arch the library holds (the build picks its archs)
    archs = {k.arch for k in kernels} & {key[0] for key in BUDGET}
    if not archs:
        pytest.skip("the library holds none of the budgeted archs (sm_80, sm_90)")
    wanted = {key for key in BUDGET if key[0] in archs}
    assert wanted <= set(counts), sorted(wanted - set(counts))
    over = {key: f"{counts[key].per_ct():.2f} > {BUDGET[key]}" for key in wanted if counts[key].per_ct() > BUDGET[key]}
    assert not over, f"instructions per channel and tap over budget (benchmarks/sass_budget.py says where): {over}"


def test_every_whole_kernel_within_its_budget(kernels, tool):
    layer = tool.stage_layer("ELSA-Swin-T", 1, 128)
    counts = {}
    for arch in {k.arch for k in kernels if k.role}:
        for dtype in ("float32", "bfloat16"):
            for w in tool.layer_kernels(kernels, arch, dtype, layer):
                counts[(arch, w.kernel, dtype)] = w.per_ct()
    wanted = {key for key in WHOLE_BUDGET if key[0] in {k.arch for k in kernels}}
    if not wanted:
        pytest.skip("the library holds none of the budgeted archs (sm_80, sm_90)")
    assert wanted <= set(counts), sorted(wanted - set(counts))
    over = {key: f"{counts[key]:.2f} > {b}" for key, b in WHOLE_BUDGET.items() if key in counts and counts[key] > b}
    assert not over, f"whole-kernel instructions per channel and tap over budget (sass_budget.py says where): {over}"


def test_the_report_covers_every_kernel_with_registers_and_estimates(kernels, tool):
    text = tool.report(kernels, all_k=False, markdown=False, devices=[tool.DEVICES[0]], batches=(128,))
    lines = text.splitlines()
    for variant in ("forward", "grad features", "attn+ghost", "attn+ghost (grad ghost_mul)"):
        for dtype in ("float32", "bfloat16"):
            assert [r for r in lines if r.startswith(variant + " ") and f" {dtype} " in r], (variant, dtype)
    for k in kernels:
        if k.K == 7 and k.V > 1:
            assert k.resources.get("REG", 0) > 0 and k.resources.get("LOCAL", 0) == 0, (k.arch, k.template, k.dtype)
    # H100 rows: 3 stages x 2 dtypes x 4 kernels at batch 128, each with its binding bound; 3 models x 2 dtypes
    rows = [r.split() for r in lines if r.startswith("H100 SXM  ")]
    whole = [r for r in rows if len(r) > 10]
    assert len(whole) == 24 and {r[-1] for r in whole} <= {"issue", "L1", "HBM", "FMA", "latency"}
    assert len([r for r in rows if r[2].startswith("ELSA-Swin")]) == 6
    # gpu_check.sh: a measured time beside the whole-kernel estimate, and measured / estimate
    seen = tool.report(kernels, False, False, [tool.DEVICES[0]], {("forward", "float32"): 0.5}, batches=(128,))
    row = next(
        r.split() for r in seen.splitlines() if r.startswith("H100 SXM  1 ") and " forward " in r and "float32" in r
    )
    est = float(row[13])  # device (2 words), stage, batch, kernel, dtype, instr/ct, warps, 5 bounds, estimate
    assert row[-2] == "0.500" and float(row[-1]) == pytest.approx(0.5 / est, abs=0.01)
    for w in tool.layer_kernels(kernels, "sm_90", "float32", tool.stage_layer("ELSA-Swin-T", 1, 128)):
        if w.channel_taps:
            assert 0 < w.roofline_ms(tool.DEVICES[0]) <= w.estimate_ms(tool.DEVICES[0])


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


def test_the_control_flow_of_a_known_listing(tool):
    """Blocks, dominators and the loop of the fixed listing: the loop is one block that dominates its
    exit; the code before it runs on every path (it dominates the loop)."""
    (code,) = tool.parse_sass(LISTING).values()
    flow = tool.Flow(code)
    (loop,) = flow.loops
    assert flow.blocks[loop.header].start == 0x20 and flow.count(loop.blocks).instructions == 9
    assert flow.count(flow.dom[loop.header] - {loop.header}).instructions == 2
    assert flow.count(flow.path(loop)).instructions == 2 + 2  # before it, then the store and EXIT
    assert flow.loads(loop.blocks) == (1, 2) and flow.count(loop.blocks).fp32 == 2


def test_the_whole_kernel_arithmetic(tool):
    """The work split, wavefronts, banks, occupancy and bounds the whole-kernel estimate rests on."""
    layer = tool.stage_layer("ELSA-Swin-T", 1, 128)
    assert layer == tool.Layer(128, 96, 56, 56, 3, 7)
    assert tool.stage_layer("ELSA-Swin-B", 3, 1) == tool.Layer(1, 512, 14, 14, 16, 7)
    plan = tool.attn_plan(layer, 4)  # launch.h's plan: 8 vectors x 49 taps per block, 8 slots a step
    assert (plan["chunk_vectors"], plan["chunk_taps"], plan["chunks"], plan["step"]) == (8, 49, 1, 8)
    assert plan["tile_slots"] == [288] * 10 + [256]  # 11 tiles of 3,136 slots: 1,408 partial sums per weight
    assert tool.wavefronts([16 * k for k in range(32)], 16) == 4  # a coalesced 16-byte load: 4 lines
    assert tool.wavefronts([196 * (k // 8) for k in range(32)], 4) == 4  # 4 heads' weights: 4 lines
    assert tool.bank_wavefronts([8 * t for t in range(32)]) == 8  # a stride of 8 words: 8-way conflicts
    assert tool.occupancy("sm_90", 256, 128, 0) == 16 and tool.occupancy("sm_90", 256, 64, 0) == 32
    h100 = next(d for d in tool.DEVICES if d.name == "H100 SXM")
    ct = 128 * 96 * 56 * 56 * 49
    w = tool.Whole("forward", "float32", layer, 4 * ct / 32, 2 * ct / 32, 0.0, 544.3e6, ct, 16, 10**6)
    b = w.bounds(h100)
    assert b["issue"] == pytest.approx(4 * ct / (132 * 4 * 32 * 1.98e9), rel=1e-6)
    assert b["FMA"] == pytest.approx(2 * ct / (132 * 128 * 1.98e9), rel=1e-6)
    assert w.roofline_ms(h100) == pytest.approx(544.3e6 / 3.35e12 * 1e3, rel=1e-3)
    assert w.binding(h100) == "issue" and w.per_ct() == pytest.approx(4)
    # in bfloat16 the compulsory bytes take 0.081 ms, under the FMA floor: the roofline is arithmetic
    assert dataclasses.replace(w, dtype="bfloat16").roofline_ms(h100) == pytest.approx(0.113, rel=0.01)


def test_the_fused_pass_sums_meet_no_bank_conflicts(tool):
    """A tap's weighted sums take an odd number of shared slots (kernels.cuh's attn_ghost_sum_stride), so that
    the 32 (pixel, tap) items a warp sums in step 3 read 32 banks, for an even chunk of channel vectors (8 and 4:
    ELSA-Swin's float32 and bfloat16) and an odd one alike; step 2's stores meet none for an odd chunk (its sums
    lie contiguous) and 2 ways at most for an even one (the padding slot)."""
    for cv, ct in ((8, 49), (4, 49), (2, 49), (1, 289), (3, 49), (5, 49), (7, 49), (3, 121)):
        assert tool.sum_stride(cv) % 2 == 1 and cv <= tool.sum_stride(cv) <= cv + 1
        for first in range(0, 8 * ct - 31, 7):  # a warp's items, from any first one, across pixels
            assert tool.bank_wavefronts(tool.sum_read_words(cv, ct, list(range(first, first + 32)))) == 1
        stores = [tool.bank_wavefronts(tool.sum_store_words(cv, list(range(f, f + 32)))) for f in range(0, cv * ct, 32)]
        assert max(stores) == (1 if cv % 2 else 2)
    # chunk_vectors + 1 for an odd chunk would have folded step 3's reads 4 ways (3 vectors) or 8 (7 vectors)
    assert [tool.bank_wavefronts([i * (cv + 1) for i in range(32)]) for cv in (3, 5, 7)] == [4, 2, 8]
    # the emulation's odd cases (tests/op_cases.py) are odd by the plan the model shares with launch.h
    for B, C, H, W, G, K, _, _, dtype, cv, channel_chunks in ODD_CHUNK_CASES:
        plan = tool.attn_plan(tool.Layer(B, C, H, W, G, K), 16 // dtype.itemsize)
        assert (plan["chunk_vectors"], plan["chunks"]) == (cv, channel_chunks) and cv % 2 == 1


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
