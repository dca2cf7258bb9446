"""``python -m earlyexit`` is the ``earlyexit`` command."""

import sys

from earlyexit.cli import main

sys.exit(main())
