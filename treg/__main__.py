"""`python -m treg ...` is the same as the `treg` command (so `accelerate launch -m treg train ...` works)."""

import sys

from treg.cli import main

if __name__ == "__main__":
    sys.exit(main())
