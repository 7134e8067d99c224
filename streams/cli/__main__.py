"""``python -m streams.cli``: the ``casestream`` command."""

import sys

from streams.cli.main import main

sys.exit(main())
