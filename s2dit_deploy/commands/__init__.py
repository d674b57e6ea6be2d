"""CLI subcommands: each module has ``add_parser(subparsers)`` and ``run(args) -> (dict, str)``.

``run`` returns the machine-readable result (printed with ``--json``) and the human text.
"""

from . import bench, calibrate, compile, export, generate, init, models, prune, search, train, validate

COMMANDS = (models, init, export, generate, compile, validate, bench, calibrate, train, search, prune)
