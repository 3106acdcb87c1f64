"""``python -m core``: the SRMF engine's command line (see :mod:`core.cli`)."""
import sys

from .cli import main

sys.exit(main())
