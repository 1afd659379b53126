"""The `multiplex-trl` console script: `multiplex-trl <command> [args...]`.

Each command is a module with `main(argv)` (or `cli(argv)` returning an exit status), imported only when it runs (training pulls in torch, TRL, DeepSpeed).
"""

from __future__ import annotations

import importlib
import sys


# command -> (module, one-line description). `generate` and `eval` live in modules written alongside this one.
COMMANDS = {
    "grpo": ("multiplex_trl.grpo", "train with Multiplex GRPO from a recipe (--config recipe.yaml [--field value])"),
    "generate": ("multiplex_trl.inference", "decode prompts with multiplex thinking"),
    "eval": ("multiplex_trl.evaluate", "evaluate a model on math benchmarks (Pass@1, Pass@k)"),
}


def usage() -> str:
    lines = ["usage: multiplex-trl <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "`multiplex-trl <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"multiplex-trl: error: unknown command {command!r}; choose one of {list(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # a missing dependency inside the module: show the real error
        print(
            f"multiplex-trl: error: the {command!r} command is not available ({module_name} is missing).",
            file=sys.stderr,
        )
        return 2
    # A module's `cli(argv)` (errors as one line, exit status) is preferred over its `main(argv)`.
    entry = getattr(module, "cli", module.main)
    program, sys.argv[0] = sys.argv[0], f"multiplex-trl {command}"  # the name argparse shows in usage and errors
    try:
        result = entry(rest)
    finally:
        sys.argv[0] = program
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
