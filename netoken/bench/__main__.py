"""`python -m netoken.bench`: the same as `netoken bench`."""

import sys

from .cli import main

sys.exit(main())
