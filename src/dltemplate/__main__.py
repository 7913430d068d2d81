"""Allow ``python -m dltemplate ...``."""

import sys

from dltemplate.cli import main

sys.exit(main())
