"""``eoir-models``: the bundled models and their cards."""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eoir-models", description="List the bundled models.")
    p.add_argument("--json", action="store_true", help="print the full model cards as JSON")
    args = p.parse_args(argv)
    from EOIRRegistrationLib.engine.modelfile import list_bundled_models
    from EOIRRegistrationLib.engine.options import DEFAULT_MODEL
    infos = list_bundled_models()
    if args.json:
        print(json.dumps([{"name": i.name, "path": i.path, "card": i.card} for i in infos],
                         indent=2))
        return 0
    if not infos:
        print("no bundled models are installed")
        return 1
    for i in infos:
        card = i.card
        tag = " (default)" if i.name == DEFAULT_MODEL else ""
        print(f"{i.name}{tag}\n  {i.description}")
        print(f"  working spacing {card.get('working_spacing_mm')} mm; trained on "
              f"{card.get('training_data', '?')}")
        if card.get("validation"):
            print(f"  validation: {card['validation']}")
        print(f"  file: {i.path}")
    return 0
