"""`python -m router`: the `embedserve` command where no console script is installed (a source
checkout on PYTHONPATH, as the GPU check runs it)."""

import sys

from router.cli import main

sys.exit(main())
