"""`python -m netoken` is the `netoken` command."""

import sys

from .cli import main

sys.exit(main())
