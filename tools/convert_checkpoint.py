#!/usr/bin/env python3
"""Convert an ELSA-Swin checkpoint (the original's, or ours) to our layout: see --help."""

import sys

from elsa_swin.convert import main

if __name__ == "__main__":
    sys.exit(main())
