import sys

from slime_wf_cli import main

sys.exit(main())
