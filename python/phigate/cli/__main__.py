"""`python -m phigate.cli`: the same as the `phigate` command."""

import sys

from phigate.cli import main

sys.exit(main())
