"""``python -m seqactor.cli``: the same as the ``seqactor`` command."""

import sys

from seqactor.cli import main

sys.exit(main())
