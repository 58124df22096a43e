"""``python -m EOIRRegistrationLib {register,batch,train,models,demo} ...``: the commands without
installing their console scripts."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"register": "register a pair of images (eoir-register)",
            "batch": "register a cohort of pairs from a manifest (eoir-batch)",
            "train": "train a model (eoir-train)",
            "models": "list the bundled models (eoir-models)",
            "demo": "register the bundled phantom pair and score it"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m EOIRRegistrationLib {register,batch,train,models,demo} ...\n"
              + "\n".join(f"  {name:<9} {what}" for name, what in COMMANDS.items()),
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command = importlib.import_module(f"EOIRRegistrationLib.cli.{argv[0]}")
    return command.main(argv[1:])
