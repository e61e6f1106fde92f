"""`python -m aniso_fast COMMAND [options]`: the package's commands, each also `python -m aniso_fast.COMMAND`."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sample": "fast low-NFE generation with the shipped models (the main job)",
    "train": "train a model: the core stages, VSDM or VSMD, on your data or from an EDM network",
    "evaluate": "the FD of your own samples, solver accuracy, the results table, recipes, fitted grids, the classifier",
    "models": "list, export and build the shipped models",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "usage: python -m aniso_fast COMMAND [options]   (COMMAND --help for its options)\n\ncommands:\n" + \
        "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: COMMAND: expected one of {', '.join(COMMANDS)}, got {command!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"aniso_fast.{command}")
    sys.argv[0] = f"python -m aniso_fast {command}"
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
