"""`python -m dsv3 ...` (what torchrun launches) is the same as the `dsv3` console script."""
import sys

from dsv3.cli import main

sys.exit(main())
