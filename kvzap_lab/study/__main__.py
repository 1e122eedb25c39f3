"""``python -m kvzap_lab.study``: see :mod:`kvzap_lab.study`."""

import sys

from kvzap_lab import cli
from kvzap_lab.study.cli import PROG, main

sys.exit(cli.run(main, prog=PROG))
