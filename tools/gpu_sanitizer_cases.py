"""Small forward+backward calls of elsa_op on CUDA for compute-sanitizer (tools/gpu_check.sh).

Every kernel family is reached: templated K with 16-byte vectors (4- and 8-wide), runtime K, scalar loads
(heads not a multiple of the vector), chunked heads, both layouts, strides and dilations, windows wider
than the image, features off 16-byte alignment (a storage offset of one element: the scalar kernels), and
broadcast / per-image / mixed / no ghost kernels; float32 and bfloat16 (float16 and float64 run the same
code with another element type). Run it where elsa_op imports (installed, or as gpu_check.sh runs it):

    compute-sanitizer --tool memcheck --kernel-name kns=elsa_op python tools/gpu_sanitizer_cases.py
"""

import itertools

import torch

from elsa_op import elsa_function

GEOMETRIES = [  # B, C, H, W, G, K, dilation, stride
    (2, 16, 9, 11, 2, 3, 1, 1),
    (1, 32, 8, 10, 1, 7, 2, 2),
    (2, 12, 7, 5, 2, 5, 1, 3),  # 6 channels per head: scalar loads
    (1, 16, 3, 4, 2, 13, 1, 1),  # window wider than the image
    (1, 64, 6, 5, 1, 13, 1, 1),  # head split into chunks
    (1, 16, 5, 6, 2, 15, 2, 1),  # runtime K
]
GHOSTS = {
    "broadcast": lambda B, C, K: ((C, K, K), (C, K, K)),
    "batched": lambda B, C, K: ((B, C, K, K),) * 2,
    "mixed": lambda B, C, K: ((C, K, K), (B, C, K, K)),
    "none": lambda B, C, K: (None, None),
}


def main() -> None:
    torch.manual_seed(0)
    calls = 0
    for dtype, layout, geometry, ghost in itertools.product(
        (torch.float32, torch.bfloat16), ("nchw", "channels_last", "offset"), GEOMETRIES, GHOSTS
    ):
        B, C, H, W, G, K, d, s = geometry
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        x = torch.randn(B, C, H, W, device="cuda", dtype=dtype)
        h = torch.randn(B, G, K * K, Ho, Wo, device="cuda", dtype=dtype).softmax(2)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "offset":  # channels-last memory one element into its own allocation
            flat = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
            x = flat[1:].view(B, H, W, C).permute(0, 3, 1, 2).copy_(x)
        if layout != "nchw":
            h = h.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
        gdtype = torch.float64 if dtype == torch.float64 else torch.float32
        m, a = (torch.randn(shape, device="cuda", dtype=gdtype) if shape else None for shape in GHOSTS[ghost](B, C, K))
        leaves = [t.requires_grad_() for t in (x, h, m, a) if t is not None]
        out = elsa_function(x, h, m, a, kernel_size=K, dilation=d, stride=s)
        torch.autograd.grad(out, leaves, torch.randn_like(out))
        calls += 1
    torch.cuda.synchronize()
    print(f"sanitizer cases done: {calls} forward+backward calls")


if __name__ == "__main__":
    main()
