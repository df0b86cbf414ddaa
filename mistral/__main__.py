"""``python -m mistral``: the same command line as ``mistral``."""

import sys

from mistral.cli import main

sys.exit(main())
