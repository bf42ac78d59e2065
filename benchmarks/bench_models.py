"""Images/s of ELSA-Swin-T against timm's Swin-T, and of ELSA-Swin-T on elsa_op against the same model
on the original's unfold path, inference and training (forward + backward + SGD step), in one run.

    python benchmarks/bench_models.py [--device cpu|cuda] [--batch 8] [--reps 3] [--img-size 224]

Ratios are against Swin-T measured in the same run.
"""
import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cls"))
import models  # noqa: E402,F401  (registers the ELSA-Swin models)

import elsa_op.layers  # noqa: E402
from elsa_op import elsa_reference  # noqa: E402


@contextmanager
def unfold_path():
    """Run the ELSA layers on the pure-PyTorch unfold path, ghost kernels expanded to the batch as the
    original did."""
    original = elsa_op.layers.elsa_function

    def unfold(features, h_attn, ghost_mul=None, ghost_add=None, **kw):
        B = features.shape[0]
        expand = lambda t: None if t is None else t.expand(B, -1, -1, -1)  # noqa: E731
        return elsa_reference(features, h_attn, expand(ghost_mul), expand(ghost_add), **kw)

    elsa_op.layers.elsa_function = unfold
    try:
        yield
    finally:
        elsa_op.layers.elsa_function = original


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(model, x, train: bool, reps: int) -> float:
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            model(x).float().logsumexp(-1).mean().backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    step()  # warm-up
    times = []
    for _ in range(reps):
        sync(x.device)
        t0 = time.perf_counter()
        step()
        sync(x.device)
        times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# images/s, batch {args.batch}, {args.img_size}x{args.img_size}, {where}, torch {torch.__version__}, median of {args.reps}")
    print("| model | inference img/s | training img/s | inference vs Swin-T | training vs Swin-T |")
    print("|---|---|---|---|---|")
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=args.img_size).to(device)
    elsa = timm.create_model("elsa_swin_tiny", img_size=args.img_size).to(device)
    rows = [("swin_tiny_patch4_window7_224 (timm)", swin, None), ("elsa_swin_tiny (elsa_op)", elsa, None),
            ("elsa_swin_tiny (unfold path)", elsa, unfold_path)]
    base = None
    for name, model, ctx in rows:
        with ctx() if ctx else nullcontext():
            inf = images_per_second(model, x, False, args.reps)
            trn = images_per_second(model, x, True, args.reps)
        base = base or (inf, trn)
        print(f"| {name} | {inf:.1f} | {trn:.1f} | {inf / base[0]:.2f}x | {trn / base[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
