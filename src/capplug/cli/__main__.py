"""``python -m capplug.cli``: the ``capplug`` command."""

import sys

from capplug.cli.main import main

sys.exit(main())
