#!/usr/bin/env python3
"""Evaluate a detector: python tools/test.py CONFIG CHECKPOINT --eval bbox segm"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from elsa_mm.tools import add_plugin_path, check_metrics, load_config, test, test_parser  # noqa: E402

METRICS = ("bbox", "segm", "proposal")

if __name__ == "__main__":
    add_plugin_path(__file__)
    args = test_parser(f"COCO metrics to compute, any of {', '.join(METRICS)} (default: the config's)").parse_args()
    cfg = load_config(args)
    if args.eval:
        cfg.test_evaluator.metric = check_metrics(args.eval, METRICS)
    test(cfg, args)
