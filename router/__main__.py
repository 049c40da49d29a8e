"""`python -m router`: the `embedserve` command where no console script is installed (a source
checkout on PYTHONPATH, as the GPU check runs it)."""

import sys

from router.cli import main

if __name__ == "__main__":  # importing the package's modules (tests walk them) starts nothing
    sys.exit(main())
