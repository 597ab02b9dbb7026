"""``python -m torch_ext.train``: see :mod:`torch_ext.train`."""

import sys

from . import cli

sys.exit(cli())
