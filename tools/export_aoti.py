#!/usr/bin/env python3
"""Package an ELSA-Swin with AOTInductor and check the package against eager PyTorch: see --help."""

import sys

from elsa_swin.aoti import main

if __name__ == "__main__":
    sys.exit(main())
