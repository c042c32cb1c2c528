"""`python -m proxy` is the `bascule` command."""

import sys

from proxy.cli import main

sys.exit(main())
