"""``python -m af2_ext``: the ``af2-ext`` command line of the protein application (:mod:`af2_ext.app.cli`), the
library's one door into it: imported only when run."""
import sys

if __name__ == "__main__":
    from af2_ext.app.cli import main

    sys.exit(main())
