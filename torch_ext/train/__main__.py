"""``python -m torch_ext.train``: see :mod:`torch_ext.train`."""

import sys

from .run import cli

sys.exit(cli())
