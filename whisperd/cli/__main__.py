"""`python -m whisperd.cli`: the same command line as the `whisperd` script."""

import sys

from whisperd.cli.commands import main

sys.exit(main())
