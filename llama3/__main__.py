"""``python -m llama3`` is the ``llama3`` command."""

import sys

from .cli import main

sys.exit(main())
