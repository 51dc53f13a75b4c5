"""`python -m qlora ...`: the same command line as the `qlora` console script."""

import sys

from qlora.cli import main

sys.exit(main())
