#!/usr/bin/env python3
"""Evaluate a segmentor: python tools/test.py CONFIG CHECKPOINT [--aug-test] --eval mIoU"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from mmengine.logging import print_log

from elsa_mm.tools import check_metrics, load_config, set_evaluator_options, test, test_parser

METRICS = ("mIoU", "mDice", "mFscore")


def add_aug_test(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aug-test",
        action="store_true",
        help="multi-scale (0.5-1.75) + flip test-time augmentation, the config's tta_pipeline",
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = test_parser(
        f"metrics to compute, any of {', '.join(METRICS)} (default: the config's)", add_aug_test, "cfg_options"
    ).parse_args(argv)
    cfg = load_config(args)
    if args.eval and args.format_only:
        raise SystemExit("error: --eval and --format-only: --format-only writes the results without scoring them")
    if args.eval:
        cfg.test_evaluator.iou_metrics = check_metrics(args.eval, METRICS)
    options = dict(args.eval_options or {})
    if options.pop("efficient_test", None) is not None:
        print_log("--eval-options efficient_test: mmseg 1.x always scores each image as it comes", "current")
    if options or args.format_only:
        from mmseg.registry import METRICS as REGISTRY

        # The original's imgfile_prefix is mmseg's output_dir (one PNG of labels per image).
        set_evaluator_options(cfg, options, REGISTRY, renames={"imgfile_prefix": "output_dir"})
    if args.format_only:
        cfg.test_evaluator[0].format_only = True
        cfg.test_evaluator[0].setdefault("output_dir", str(Path(cfg.work_dir) / "format_results"))
    if args.aug_test:
        # What mmseg's own tools/test.py --tta does.
        if not cfg.get("tta_pipeline") or not cfg.get("tta_model"):
            raise SystemExit(f"error: --aug-test: {args.config} has no tta_pipeline and tta_model")
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    return test(cfg, args)


if __name__ == "__main__":
    main()
