#!/usr/bin/env python3
"""Evaluate a detector: python tools/test.py CONFIG CHECKPOINT --eval bbox segm"""

from collections.abc import Sequence

from elsa_mm.tools import check_metrics, load_config, test, test_parser

METRICS = ("bbox", "segm", "proposal")


def main(argv: Sequence[str] | None = None) -> dict:
    args = test_parser(f"COCO metrics to compute, any of {', '.join(METRICS)} (default: the config's)").parse_args(argv)
    cfg = load_config(args)
    if args.eval:
        cfg.test_evaluator.metric = check_metrics(args.eval, METRICS)
    return test(cfg, args)


if __name__ == "__main__":
    main()
