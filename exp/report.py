"""`python -m exp.report SWEEP_DIR|RUN_DIR|EXPERIMENT`: the report lives in exp.sweep.report."""

import sys

from exp.sweep.report import main

if __name__ == "__main__":
    sys.exit(main())
