"""`python -m exp.sweep status|resume|rerun-failed SWEEP_DIR`: see exp.sweep.cli."""

import sys

from exp.sweep.cli import main

sys.exit(main())
