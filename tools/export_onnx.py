#!/usr/bin/env python3
"""Export an ELSA-Swin classifier to ONNX and check it with onnxruntime: see --help."""

import sys

from elsa_swin.onnx import main

if __name__ == "__main__":
    sys.exit(main())
