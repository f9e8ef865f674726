"""`python -m slime_wf.config` prints the configuration reference; `--write-readme PATH` rewrites
it between the markers of that README."""

import sys

from .reference import config_reference_markdown, update_readme

if sys.argv[1:2] == ["--write-readme"]:
    update_readme(sys.argv[2])
else:
    print(config_reference_markdown())
