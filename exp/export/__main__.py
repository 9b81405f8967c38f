"""`python -m exp.export CHECKPOINT OUT [--format hf]`."""

import sys

from exp.export import main

sys.exit(main())
