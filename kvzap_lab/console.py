"""The ``kvzap-lab`` command: one entry point dispatching to each tool's ``main``.

    kvzap-lab collect --model testbed --out results/data/testbed
    kvzap-lab train --policy mlp --data results/data/testbed --out results/mlp
    kvzap-lab evaluate --policies full oracle mlp@results/mlp
    kvzap-lab study --policy mlp
    kvzap-lab --version

``kvzap-lab COMMAND ARGS`` is ``python -m kvzap_lab.COMMAND ARGS``: same options, same exit codes (2 for bad
input, with one line naming the problem).
"""

from __future__ import annotations

import importlib
import sys

import kvzap_lab
from kvzap_lab import cli

COMMANDS = {
    "collect": ("kvzap_lab.collect", "collect an oracle dataset (hidden states -> KVzip+ scores)"),
    "train": ("kvzap_lab.train", "train a scorer on a dataset"),
    "evaluate": ("kvzap_lab.evaluate", "accuracy against compression of policies on the task suite"),
    "study": ("kvzap_lab.study", "Optuna search of a scorer and its rule, tracked in MLflow"),
    "finetune": ("kvzap_lab.finetune", "fine-tune a scorer on the model's own outputs (soft eviction)"),
    "testbed": ("kvzap_lab.testbed", "train or evaluate the bundled test-bed model"),
    "kvpress": ("kvzap_lab.kvpress", "export a trained scorer to kvpress"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: kvzap-lab [--version] COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\n`kvzap-lab COMMAND --help` lists a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``kvzap-lab COMMAND ARGS``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    Returns:
        the command's exit code; 0 for ``--version`` and ``--help``; 2 for a missing or unknown command.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"kvzap-lab {kvzap_lab.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"kvzap-lab: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (or --version)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return cli.run(module.main, argv[1:])


def entry_point() -> None:
    """The console script (``[project.scripts]``)."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
