import sys

from exp.eval.cli import main

sys.exit(main())
