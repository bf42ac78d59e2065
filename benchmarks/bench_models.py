"""Images/s of ELSA-Swin-T against timm's Swin-T, and of ELSA-Swin-T on elsa_op against the same model
on the original's unfold path, inference and training (forward + backward + SGD step), in one run.

    python benchmarks/bench_models.py [--device cpu|cuda] [--batch N] [--reps 5] [--img-size 224]
                                      [--amp none|bfloat16|float16] [--[no-]channels-last] [--[no-]unfold]

Ratios are against Swin-T measured in the same run; Swin-T and ELSA-Swin-T take turns, one step each per
round. On CUDA the defaults are what training there uses: batch 128, autocast to bfloat16 and
channels-last input, and no unfold path (at batch 128 it needs tens of GiB); on CPU batch 8, float32.
"""

import argparse
import contextlib
import statistics
import time

import timm
import torch

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, x, train: bool, amp=None):
    """One inference forward, or one training step (forward, backward, SGD); `amp`: autocast dtype or None."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def autocast():
        return torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step():
        model.train(train)
        if train:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast():
                model(x)

    return step


def images_per_second(steps, x, reps: int) -> list:
    """Median images/s of each step. The steps take turns, one timed call each per round, so that drift in
    the machine's speed reaches all of them alike."""
    times = [[] for _ in steps]
    for rnd in range(reps + 1):  # round 0 warms up
        for k, step in enumerate(steps):
            sync(x.device)
            t0 = time.perf_counter()
            step()
            sync(x.device)
            if rnd:
                times[k].append(time.perf_counter() - t0)
    return [x.shape[0] / statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--amp",
        choices=["none", "bfloat16", "float16"],
        default=None,
        help="autocast dtype; default: bfloat16 on CUDA, none on CPU",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="models and input in channels-last memory; default: on CUDA",
    )
    parser.add_argument(
        "--unfold",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run ELSA-Swin-T on the unfold path; default: on CPU only",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 8)
    amp_name = args.amp or ("bfloat16" if cuda else "none")
    amp = None if amp_name == "none" else getattr(torch, amp_name)
    channels_last = cuda if args.channels_last is None else args.channels_last
    with_unfold = not cuda if args.unfold is None else args.unfold
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# images/s, batch {batch}, {args.img_size}x{args.img_size}, autocast {amp_name}, "
        f"{'channels-last' if channels_last else 'NCHW'} input, {where}, torch {torch.__version__}, "
        f"median of {args.reps} interleaved rounds"
    )
    print("| model | inference img/s | training img/s | inference vs Swin-T | training vs Swin-T |")
    print("|---|---|---|---|---|")
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=args.img_size).to(device, memory_format=fmt)
    elsa = timm.create_model("elsa_swin_tiny", img_size=args.img_size).to(device, memory_format=fmt)
    rows = [("swin_tiny_patch4_window7_224 (timm)", swin), ("elsa_swin_tiny (elsa_op)", elsa)]
    if with_unfold:
        unfold = timm.create_model("elsa_swin_tiny", img_size=args.img_size, backend="reference")
        unfold = unfold.to(device, memory_format=fmt)
        unfold.load_state_dict(elsa.state_dict())
        rows.append(("elsa_swin_tiny (unfold path)", unfold))
    # Swin-T and ELSA-Swin-T take turns; the unfold path runs on its own afterwards, because its
    # gigabytes of temporaries would slow down whichever model runs after it.
    inference, training = [], []
    for part in (rows[:2], rows[2:]):
        if not part:
            continue
        inference += images_per_second([make_step(m, x, False, amp) for _, m in part], x, args.reps)
        training += images_per_second([make_step(m, x, True, amp) for _, m in part], x, args.reps)
    for (name, _), inf, trn in zip(rows, inference, training, strict=True):
        print(f"| {name} | {inf:.1f} | {trn:.1f} | {inf / inference[0]:.2f}x | {trn / training[0]:.2f}x |")


if __name__ == "__main__":
    main()
