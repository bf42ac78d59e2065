#!/usr/bin/env python3
"""Evaluate a detector: python tools/test.py CONFIG CHECKPOINT --eval bbox segm"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from elsa_mm.tools import check_metrics, load_config, set_evaluator_options, test, test_parser

METRICS = ("bbox", "segm", "proposal")


def add_det_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fuse-conv-bn", action="store_true", help="fold BatchNorm into the convolutions before testing"
    )
    parser.add_argument(
        "--show-score-thr", type=float, default=0.3, help="--show / --show-dir draw boxes above this score (0.3)"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = test_parser(
        f"COCO metrics to compute, any of {', '.join(METRICS)} (default: the config's)", add_det_options
    ).parse_args(argv)
    cfg = load_config(args)
    if args.eval and args.format_only:
        raise SystemExit("error: --eval and --format-only: --format-only writes the results without scoring them")
    if args.eval:
        cfg.test_evaluator.metric = check_metrics(args.eval, METRICS)
    if args.eval_options or args.format_only:
        from mmdet.registry import METRICS as REGISTRY

        # The original's jsonfile_prefix is mmdet's outfile_prefix (<prefix>.bbox.json, <prefix>.segm.json).
        set_evaluator_options(cfg, args.eval_options or {}, REGISTRY, renames={"jsonfile_prefix": "outfile_prefix"})
    if args.format_only:
        cfg.test_evaluator[0].format_only = True
        cfg.test_evaluator[0].setdefault("outfile_prefix", str(Path(cfg.work_dir) / "results"))
    if args.fuse_conv_bn:
        cfg.custom_hooks = [*(cfg.get("custom_hooks") or []), dict(type="FuseConvBNHook")]
    if args.show or args.show_dir:
        cfg.default_hooks.visualization.score_thr = args.show_score_thr
    return test(cfg, args)


if __name__ == "__main__":
    main()
