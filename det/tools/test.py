#!/usr/bin/env python3
"""Evaluate a detector: python tools/test.py CONFIG CHECKPOINT --eval bbox segm"""

from elsa_mm.tools import check_metrics, load_config, test, test_parser

METRICS = ("bbox", "segm", "proposal")

if __name__ == "__main__":
    args = test_parser(f"COCO metrics to compute, any of {', '.join(METRICS)} (default: the config's)").parse_args()
    cfg = load_config(args)
    if args.eval:
        cfg.test_evaluator.metric = check_metrics(args.eval, METRICS)
    test(cfg, args)
