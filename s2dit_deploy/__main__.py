"""``python -m s2dit_deploy``: the CLI, also the entry the training commands use under torchrun
(``torchrun --nproc_per_node 2 -m s2dit_deploy search ...``)."""

import sys

from .cli import main

sys.exit(main())
