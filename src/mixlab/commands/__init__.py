"""One module per ``mixlab`` subcommand: each has ``configure(parser)`` and ``run(args) -> int``."""

import json


def print_json(result, wanted: bool) -> bool:
    """Print ``result`` as indented JSON when the user asked for it (``--json``); True if printed,
    so a command reads ``if print_json(r, args.json): return 0`` before its own lines."""
    if wanted:
        print(json.dumps(result, indent=2))
    return wanted
