"""``python -m lmcompose.cli``: the same as the ``lmcompose`` command."""

import sys

from . import main

sys.exit(main())
