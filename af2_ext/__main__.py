"""``python -m af2_ext``: the ``af2-ext`` command line."""
import sys

from af2_ext.cli import main

sys.exit(main())
