"""Copy a trained model file into the engine's bundled models, with its card as JSON beside it
(the Slicer panel lists models from the JSON without importing torch).

    python Utilities/bundle_model.py runs/synth/model.pt eoir-synth-ns8 [--description "..."]

Then add both files to MODULE_PYTHON_RESOURCES in EOIRRegistration/CMakeLists.txt (the test
suite checks that every file of the module folder is listed).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "EOIRRegistration"))

from EOIRRegistrationLib.engine.modelfile import BUNDLED_DIR, load_model, save_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model.pt written by eoir-train")
    ap.add_argument("name", help="bundled name (file stem)")
    ap.add_argument("--description", help="replace the card's one-line description")
    ap.add_argument("--card-json", help="JSON file whose keys are merged into the card")
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    card = dict(loaded.card, name=args.name)
    if "training_config" in card:  # a machine's folder says nothing to users of the model
        card["training_config"] = dict(card["training_config"], output_dir=f"runs/{args.name}")
    if args.description:
        card["description"] = args.description
    if args.card_json:
        card.update(json.loads(Path(args.card_json).read_text()))
    BUNDLED_DIR.mkdir(exist_ok=True)
    target = BUNDLED_DIR / f"{args.name}.pt"
    save_model(target, loaded.model, card)
    (BUNDLED_DIR / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {target} and {target.with_suffix('.json')}")
    print("CMake resources:\n  EOIRRegistrationLib/bundled_models/"
          f"{args.name}.pt\n  EOIRRegistrationLib/bundled_models/{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
