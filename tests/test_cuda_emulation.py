"""The CUDA kernels' maths, checked without a GPU.

tests/cuda_emulation/emulation.cpp compiles the CUDA operator's host code (elsa_op/csrc/cuda/launch.h) and
kernel bodies (kernels.cuh) with the host compiler and runs every launch over its full grid on CPU (shared
memory poisoned with NaN, barriers enforced, outputs poisoned, and every memory access checked for
alignment, for bounds of its tensor's storage and view, and for bounds of shared memory; see that file and
elsa_op/csrc/cuda/access.h). Here its results are compared with elsa_reference, the op's definition, over
kernel sizes, dilations, strides, dtypes, layouts, ghost kernels, gradient subsets, small images, chunked
heads and indices past 2^31; and tensors off vector alignment must take the scalar kernels.
"""

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from op_cases import (
    GEOMETRIES,
    ODD_CHUNK_CASES,
    assert_close_scaled,
    geometry_id,
    make_case,
    reference_grads,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.emulation


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = REPO / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    # torch rebuilds when the sources or flags change; the flags carry a hash of the headers, so that an edit
    # of the kernels is never tested against a stale build.
    headers = sorted((REPO / "elsa_op" / "csrc").rglob("*.h")) + sorted((REPO / "elsa_op" / "csrc").rglob("*.cuh"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in headers)).hexdigest()[:16]
    return load(
        name="elsa_cuda_emulation",
        sources=[str(REPO / "tests" / "cuda_emulation" / "emulation.cpp")],
        extra_include_paths=[str(REPO / "elsa_op" / "csrc" / "cuda")],
        # ELSA_CHECK_ACCESS: every global and shared memory access is checked (access.h).
        extra_cflags=["-std=c++20", "-O1", "-DELSA_CHECK_ACCESS", f"-DELSA_HEADERS_{digest}"],
        build_directory=str(build),
    )


def _check(emu, B, C, H, W, G, K, dilation, stride, dtype, ghost, layout, subsets=None):
    x, h, go, m, a, xl, hl, gol = make_case(B, C, H, W, G, K, dilation, stride, dtype, ghost, layout)
    return _check_tensors(emu, x, h, go, m, a, xl, hl, gol, G, K, dilation, stride, subsets)


def _check_tensors(emu, x, h, go, m, a, xl, hl, gol, G, K, dilation, stride, subsets=None):
    """Every op of the emulation on xl, hl, gol (views of x, h, go in any memory) against the reference."""
    dtype, (H, W) = x.dtype, x.shape[2:]
    channels_last = xl.shape[1] > 1 and xl.stride(1) == 1  # results come back in the features' layout
    out_ref, (gx_ref, gh_ref, gm_ref, ga_ref) = reference_grads(x, h, go, m, a, K, dilation, stride)
    ran = []

    out, r = emu.forward(xl, hl, m, a, K, dilation, stride, -1)
    ran += r
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_close_scaled(out, out_ref, dtype, "forward")

    gx, r = emu.backward_features(gol, hl, m, a, H, W, K, dilation, stride, -1)
    ran += r
    assert_close_scaled(gx, gx_ref, dtype, "grad features")

    mul_batched = m is not None and m.dim() == 4
    add_batched = a is not None and a.dim() == 4
    for need in subsets or itertools.product((False, True), repeat=3):
        need_attn, need_mul, need_add = need[0], need[1] and m is not None, need[2] and a is not None
        gh, gm, ga, r = emu.backward_attn_ghost(
            gol, xl, hl, m, G, K, dilation, stride, need_attn, need_mul, need_add, mul_batched, add_batched, -1
        )
        ran += r
        if need_attn:
            assert gh.dtype == dtype
            assert_close_scaled(gh, gh_ref, dtype, f"grad attention {need}")
        else:
            assert gh.numel() == 0
        for grad, ref, needed, name in ((gm, gm_ref, need_mul, "ghost_mul"), (ga, ga_ref, need_add, "ghost_add")):
            if needed:
                # Ghost gradients are float32 beside half/bfloat16 (float64 for float64).
                assert grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                assert_close_scaled(
                    grad, ref, torch.float32 if dtype == torch.bfloat16 else dtype, f"grad {name} {need}"
                )
            else:
                assert grad.numel() == 0
    return ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES, ids=geometry_id)
def test_emulated_kernels_match_the_reference(emu, case, dtype):
    """Every kernel, every subset of requested gradients, broadcast ghost kernels; channels-last."""
    ran = _check(emu, *case, dtype, "broadcast", "channels_last")
    K = case[5]
    full = 16 // torch.tensor([], dtype=dtype).element_size()
    kt = 0 if dtype == torch.float64 else K  # float64 runs the runtime-K kernels
    assert f"forward<{kt},{full}>" in ran and f"features<{kt},{full}>" in ran and f"attn_ghost<{kt},{full}>" in ran


@pytest.mark.parametrize("ghost", ["batched", "mixed", None])
@pytest.mark.parametrize("layout", ["nchw", "slice", "misaligned"])
def test_emulated_ghosts_and_layouts(emu, ghost, layout):
    """Per-image and mixed ghost kernels, and every layout: NCHW (converted once at the boundary), a channel
    slice of a wider tensor (read in place), and one off 16-byte alignment (scalar loads)."""
    ran = _check(emu, 2, 16, 9, 10, 2, 5, 2, 2, torch.float32, ghost, layout)
    assert ("forward<0,1>" in ran) == (layout == "misaligned")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("only", ["ghost_mul", "ghost_add"])
def test_emulated_one_ghost_kernel(emu, only, dtype):
    """One ghost kernel without the other: the gathers are compiled for each combination of ghost kernels
    given, so each must still match the reference. 16 x 15 pixels and K = 7 give runs of pixels with their
    windows inside the image, runs across its border, and a last run of 3 pixels."""
    B, C, H, W, G, K, d, s = 2, 32, 16, 15, 2, 7, 1, 1
    x, h, go, m, a, xl, hl, gol = make_case(B, C, H, W, G, K, d, s, dtype, "mixed", "channels_last", seed=7)
    m, a = (m, None) if only == "ghost_mul" else (None, a)
    ran = _check_tensors(emu, x, h, go, m, a, xl, hl, gol, G, K, d, s, subsets=[(True, True, True)])
    full = 16 // x.element_size()
    assert f"forward<{K},{full}>" in ran and f"features<{K},{full}>" in ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 16, 12, 20, 2, 5, 2, 2), (1, 16, 9, 27, 2, 3, 3, 3)], ids=geometry_id)
def test_emulated_forward_sharing_columns_with_stride(emu, case, dtype):
    """With stride = dilation > 1, a run's pixels in the forward still share their windows' columns, each a
    stride apart: the runs whose windows are inside the image take that path (the geometries leave one such
    run per output row)."""
    ran = _check(emu, *case, dtype, "broadcast", "channels_last", subsets=[(True, True, True)])
    assert f"forward<{case[5]},{16 // dtype.itemsize}>" in ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_heads_not_a_multiple_of_the_vector(emu, dtype):
    """6 channels per head: no whole 16-byte vectors, so the scalar, runtime-K kernels."""
    ran = _check(emu, 2, 12, 7, 8, 2, 3, 1, 1, dtype, "broadcast", "channels_last", subsets=[(True, True, True)])
    assert set(ran) >= {"forward<0,1>", "features<0,1>", "attn_ghost<0,1>"}


def test_emulated_large_heads_and_kernels(emu):
    """A head with more (channel vector, tap) pairs than a block holds: its channels and taps are split into
    chunks and the attention gradient summed over channel chunks; K = 15 takes the runtime-K kernels."""
    ran = _check(
        emu,
        1,
        64,
        9,
        8,
        1,
        13,
        1,
        1,
        torch.float32,
        "broadcast",
        "channels_last",
        subsets=[(True, True, True), (True, False, False)],
    )
    assert "chunk_sum" in ran
    ran = _check(
        emu, 1, 16, 6, 5, 2, 15, 1, 1, torch.float32, "broadcast", "channels_last", subsets=[(True, True, True)]
    )
    assert "forward<0,4>" in ran


@pytest.mark.parametrize("case", ODD_CHUNK_CASES, ids=lambda c: geometry_id(c[:8]) + f"-{c[8]}")
def test_emulated_odd_chunks_of_channel_vectors(emu, case):
    """An odd number of channel vectors per chunk of the fused pass: each tap's weighted sums take exactly that
    many slots of shared memory (an odd stride, no padding), written and read back at the same places, in one
    chunk and summed over several."""
    *geometry, dtype, _, channel_chunks = case
    ran = _check(emu, *geometry, dtype, "broadcast", "channels_last", subsets=[(True, True, True)])
    assert f"attn_ghost<{geometry[5]},{16 // dtype.itemsize}>" in ran, ran
    assert ("chunk_sum" in ran) == (channel_chunks > 1)


def test_emulated_sums_over_many_taps_and_tiles(emu):
    """The fused pass's attention-gradient sums with more taps in a chunk than a block has threads (K = 17:
    289 taps of one channel vector, so that each thread's items lie a row of taps apart), and the ghost
    gradients' reduction over more tiles than it has slices, in a count that is not a multiple of them, for
    a number of weights that is not a multiple of a block's items, per image and broadcast."""
    _check(emu, 1, 8, 12, 10, 2, 17, 1, 1, torch.float32, "broadcast", "channels_last", subsets=[(True, True, True)])
    _check(emu, 3, 24, 21, 19, 3, 3, 1, 1, torch.float32, "batched", "channels_last", subsets=[(True, True, True)])
    _check(emu, 3, 24, 21, 19, 3, 3, 1, 1, torch.bfloat16, "broadcast", "nchw", subsets=[(True, True, True)])


def test_emulated_column_steps_past_32_bits(emu):
    """Features and grad_out whose neighbouring pixels lie 2^31 elements apart (in 4 GiB buffers of which
    only those pixels are ever touched): the gathers take their 64-bit paths, and the attention/ghost pass,
    which steps along runs of pixels with 32-bit offsets, gets compact copies from its launcher (without
    them its second column's loads would land outside the buffers)."""
    B, C, H, W, G, K = 1, 16, 5, 2, 2, 3
    dtype = torch.bfloat16
    x, h, go, m, a, xl, hl, gol = make_case(B, C, H, W, G, K, 1, 1, dtype, "broadcast", "channels_last")

    def wide(t):
        buffer = torch.empty(2**31 + H * C, dtype=dtype)
        return buffer.as_strided(t.shape, (H * C, 1, C, 2**31)).copy_(t)

    xw, gow = wide(xl), wide(gol)
    ran = _check_tensors(emu, x, h, go, m, a, xw, hl, gow, G, K, 1, 1, subsets=[(True, True, True)])
    assert "attn_ghost<3,8>" in ran


def test_emulated_empty_batch(emu):
    x, h, go, m, a, xl, hl, gol = make_case(0, 16, 5, 6, 2, 3, 1, 1, torch.float32, "broadcast", "channels_last")
    out, _ = emu.forward(xl, hl, m, a, 3, 1, 1, -1)
    assert out.shape == (0, 16, 5, 6)
    gh, gm, ga, _ = emu.backward_attn_ghost(gol, xl, hl, m, 2, 3, 1, 1, True, True, True, False, False, -1)
    assert gh.shape == (0, 2, 9, 5, 6) and torch.equal(gm, torch.zeros(16, 3, 3)) and torch.equal(ga, gm)


def test_emulated_indices_past_2_31(emu):
    """A bfloat16 batch of 2^31 + 2^18 elements per tensor: the last image's offsets pass 2^31 (and 2^32
    bytes). Only that image is written and emulated; the rest of each tensor is never touched (pages that
    are never touched cost no memory)."""
    B, C, H, W, G, K = 8193, 64, 64, 64, 1, 7
    assert B * C * H * W > 2**31
    dtype = torch.bfloat16
    x, h, go, m, a, *_ = make_case(1, C, H, W, G, K, 1, 1, dtype, "broadcast", "channels_last", seed=3)
    _, (_, _, gm_ref, ga_ref) = reference_grads(x, h, go, m.expand(1, -1, -1, -1), a.expand(1, -1, -1, -1), K, 1, 1)
    out_ref, (gx_ref, gh_ref, _, _) = reference_grads(x, h, go, m, a, K, 1, 1)

    def big_like(t, attn=False):
        if attn:  # [B, Ho, Wo, G, K*K] memory
            big = torch.empty(B, H, W, G, K * K, dtype=dtype)
            big[-1] = t[0].permute(2, 3, 0, 1)
            return big.permute(0, 3, 4, 1, 2)
        big = torch.empty(B, H, W, C, dtype=dtype)
        big[-1] = t[0].permute(1, 2, 0)
        return big.permute(0, 3, 1, 2)

    xb, hb, gob = big_like(x), big_like(h, attn=True), big_like(go)
    out, _ = emu.forward(xb, hb, m, a, K, 1, 1, B - 1)
    assert_close_scaled(out[-1:], out_ref, dtype, "forward past 2^31")
    del out
    gx, _ = emu.backward_features(gob, hb, m, a, H, W, K, 1, 1, B - 1)
    assert_close_scaled(gx[-1:], gx_ref, dtype, "grad features past 2^31")
    del gx
    gh, gm, ga, _ = emu.backward_attn_ghost(gob, xb, hb, m, G, K, 1, 1, True, True, True, True, True, B - 1)
    assert_close_scaled(gh[-1:], gh_ref, dtype, "grad attention past 2^31")
    # The ghost gradients sum the products of 4096 pixels in float32, so their rounding grows with that count
    # (about sqrt(4096) * 6e-8 relative to the largest); 1e-5 still fails on any wrong or missing term.
    for got, want, name in ((gm, gm_ref, "ghost_mul"), (ga, ga_ref, "ghost_add")):
        assert not torch.isnan(got[-1:]).any(), f"grad {name} past 2^31: elements no thread wrote"
        scale = want.abs().max().item()
        torch.testing.assert_close(got[-1:].double() / scale, want.double() / scale, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Memory the GPU is strict about: vector accesses must be aligned to their 16 bytes, and a read past a
# tensor must fail even where host memory lies beyond it. The launcher must send tensors that 16-byte
# vectors do not fit to the scalar kernels (V = 1); the emulation's access checks (access.h) make any
# vector access that would fault on a GPU fail here.


def _strided(t, strides_offset):
    """t ([B, C, H, W]) copied into a view with the given (strides, storage offset) over a fresh buffer."""
    strides, offset = strides_offset
    span = offset + 1 + sum((n - 1) * s for n, s in zip(t.shape, strides, strict=True))
    view = torch.full((span,), float("nan"), dtype=t.dtype).as_strided(t.shape, strides, offset)
    return view.copy_(t)


def _channels_last_strides(B, C, H, W, pixel=None, row=None, batch=None):
    """Strides of a [B, C, H, W] view of channels-last memory; rows and images padded to whole 8-element
    vectors unless given, so that each case puts exactly one stride off the vector."""
    pixel = pixel or C
    row = row or -(-W * pixel // 8) * 8
    return (batch or -(-H * row // 8) * 8, 1, row, pixel)


# (strides of the odd view for a [B, C, H, W] tensor, storage offset in elements), given the element size.
# C = 16 channels: 4 float32 vectors or 2 bfloat16 vectors per pixel in dense memory.
ODD_MEMORY = {
    "offset 4 bytes": lambda B, C, H, W, item: (_channels_last_strides(B, C, H, W), 4 // item),
    "offset 8 bytes": lambda B, C, H, W, item: (_channels_last_strides(B, C, H, W), 8 // item),
    "channel slice at an odd offset": lambda B, C, H, W, item: (_channels_last_strides(B, C, H, W, pixel=3 * C + 1), 1),
    "pixel stride not whole vectors": lambda B, C, H, W, item: (_channels_last_strides(B, C, H, W, pixel=C + 2), 0),
    "row stride not whole vectors": lambda B, C, H, W, item: (_channels_last_strides(B, C, H, W, row=W * C + 2), 0),
    "batch stride not whole vectors": lambda B, C, H, W, item: (
        _channels_last_strides(B, C, H, W, batch=H * W * C + 2),
        0,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("odd", ["features", "grad_out", "both"])
@pytest.mark.parametrize("memory", list(ODD_MEMORY))
def test_emulated_memory_off_vector_alignment_takes_the_scalar_kernels(emu, memory, odd, dtype):
    """Features or grad_out (or both) only 4- or 8-byte aligned, or with pixel, row or batch strides that are
    not whole 16-byte vectors: each kernel that reads such a tensor runs its scalar instantiation (V = 1) and
    still matches the reference; the others keep their vectors."""
    B, C, H, W, G, K, d, s = 2, 16, 7, 9, 2, 3, 1, 1
    x, h, go, m, a, _, hl, _ = make_case(B, C, H, W, G, K, d, s, dtype, "broadcast", "channels_last", seed=5)
    item = x.element_size()
    full = 16 // item
    xl = (
        _strided(x, ODD_MEMORY[memory](B, C, H, W, item))
        if odd in ("features", "both")
        else x.contiguous(memory_format=torch.channels_last)
    )
    gol = (
        _strided(go, ODD_MEMORY[memory](B, C, H, W, item))
        if odd in ("grad_out", "both")
        else go.contiguous(memory_format=torch.channels_last)
    )
    aligned = [t.data_ptr() % 16 == 0 and all(t.stride(k) % full == 0 for k in (0, 2, 3)) for t in (xl, gol)]
    if memory.endswith("stride not whole vectors"):  # that stride alone is off: each condition is tested alone
        odd_view = xl if odd != "grad_out" else gol
        off = [k for k in (0, 2, 3) if odd_view.stride(k) % full]
        assert off == [{"batch": 0, "row": 2, "pixel": 3}[memory.split()[0]]] and odd_view.data_ptr() % 16 == 0
    assert aligned[0] == (odd == "grad_out") and aligned[1] == (odd == "features"), "the case must be off alignment"
    ran = _check_tensors(emu, x, h, go, m, a, xl, hl, gol, G, K, d, s, subsets=[(True, True, True)])
    vec = {True: f"<{K},{full}>", False: "<0,1>"}
    assert f"forward{vec[aligned[0]]}" in ran, ran
    assert f"features{vec[aligned[1]]}" in ran, ran
    assert f"attn_ghost{vec[aligned[0] and aligned[1]]}" in ran, ran


def test_access_checks_raise_naming_the_kernel_and_the_address(emu):
    """The checks themselves: a misaligned vector, a read past the storage, and a read of an element that lies
    inside the storage but outside the view each raise with the kernel, the tensor and the address."""
    base = torch.arange(64, dtype=torch.float32)
    emu.probe_access(base, 0, 4, 16)  # an aligned vector inside the tensor
    emu.probe_access(base, 60, 4, 16)  # the last one
    with pytest.raises(RuntimeError, match=r"kernel probe: load of 16 bytes at 0x[0-9a-f]+ .*misaligned"):
        emu.probe_access(base, 1, 4, 16)
    with pytest.raises(RuntimeError, match=r"the probed tensor .*outside the storage"):
        emu.probe_access(base, 61, 4, 4)
    with pytest.raises(RuntimeError, match=r"outside the storage"):
        emu.probe_access(base[8:16], -9, 1, 4)
    # A channel slice [:, 4:8] of a [4, 16] tensor: element 4 of the next row lies in the storage, but the
    # slice's last element is (3, 7), so a read one element past it fails although it reads valid memory.
    piece = base.view(4, 16)[:, 4:8]
    emu.probe_access(piece, 3 * 16 + 3, 1, 4)
    with pytest.raises(RuntimeError, match=r"inside the storage but not part of the tensor"):
        emu.probe_access(piece, 3 * 16 + 4, 1, 4)
    with pytest.raises(RuntimeError, match=r"inside the storage but not part of the tensor"):
        emu.probe_access(piece, 4, 1, 4)
    # A vector that starts in the view and runs past its row.
    with pytest.raises(RuntimeError, match=r"not part of the tensor"):
        emu.probe_access(piece, 2, 4, 4)
