"""``python -m streamrecon`` = the ``streamrecon`` command."""

import sys

from .cli import main

sys.exit(main())
