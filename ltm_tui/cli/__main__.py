import sys

from ltm_tui.cli import main

sys.exit(main())
