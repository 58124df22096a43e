"""``eoir-train``: train an EOIR or GeoReg model (``training/trainer.py`` does the work)."""
from __future__ import annotations

import argparse
import json
import sys

from EOIRRegistrationLib.cli.interrupts import Interrupted, raise_on_signals
from EOIRRegistrationLib.core.errors import EOIRError
from EOIRRegistrationLib.engine.allocator import keep_freed_memory
from EOIRRegistrationLib.engine.options import DEVICES
from EOIRRegistrationLib.models import ARCHITECTURES
from EOIRRegistrationLib.models.eoir import EOIRConfig
from EOIRRegistrationLib.training.objectives import SIMILARITIES, ObjectiveConfig
from EOIRRegistrationLib.training.trainer import TrainConfig

# The defaults, spelt once: in the configuration classes the trainer takes.
TRAIN = TrainConfig(output_dir="")
OBJECTIVE = ObjectiveConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoir-train", description=(
        "Train an EOIR registration model on synthetic pairs (no data needed), a folder of "
        "images (label maps named *_seg* or *label*) or a Learn2Reg-style JSON."))
    p.add_argument("--output-dir", required=True, help="folder for checkpoint.pt, log.csv, model.pt")
    p.add_argument("--data", default=TRAIN.data,
                   help="'synthetic', 'labelmaps:FOLDER' (SynthMorph-style pairs from label "
                        "maps), a folder of images, or a Learn2Reg JSON file")
    p.add_argument("--model", default=TRAIN.architecture, choices=sorted(ARCHITECTURES), help="architecture")
    p.add_argument("--channels", type=int, default=None,
                   help="EOIR encoder width Ns (paper: 32, 16, 8; default "
                        f"{TRAIN.model_config['channels']})")
    p.add_argument("--levels", type=int, default=None,
                   help=f"EOIR pyramid levels (default {EOIRConfig.levels})")
    p.add_argument("--model-config", default="{}",
                   help="JSON of further architecture options, e.g. '{\"composition\": \"add\"}'")
    p.add_argument("--shape", type=int, nargs=3, default=list(TRAIN.shape),
                   help="training crop, array order D H W (multiples of 16; default: %(default)s)")
    p.add_argument("--working-spacing", type=float, nargs=3, default=list(TRAIN.working_spacing_mm),
                   help="mm (x y z) at which the model registers; stored in the model card (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=TRAIN.iterations,
                   help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=TRAIN.batch_size,
                   help="pairs per step, stacked into one batch (smoother gradients; memory and "
                        "time per step grow with it)")
    p.add_argument("--lr", type=float, default=TRAIN.learning_rate,
                   help="Adam (AMSGrad) learning rate (default: %(default)s)")
    p.add_argument("--poly-decay", action="store_true",
                   help="learning rate decays as (1 - step / iterations)^0.9")
    p.add_argument("--similarity", choices=SIMILARITIES, default=OBJECTIVE.similarity,
                   help="image similarity; 'none' trains on the Dice term alone (use with "
                        "labelmaps: data, whose two images have independent contrasts)")
    p.add_argument("--reg-weight", type=float, default=OBJECTIVE.regularization_weight,
                   help="diffusion weight on velocities (default: %(default)s)")
    p.add_argument("--dice-weight", type=float, default=OBJECTIVE.dice_weight,
                   help="soft Dice weight (needs labels; default: %(default)s)")
    p.add_argument("--dice-labels", choices=["all", "standard30", "standard27"], default="all",
                   help="labels of the Dice term and of validation: every label of the fixed map "
                        "(all), the 30 standard FreeSurfer brain structures (standard30), or the "
                        "27 of them defined alike in SynthSeg maps (standard27: no CSF 24, no "
                        "choroid plexus 31/63; use it with SynthSeg label maps)")
    p.add_argument("--data-options", default="{}",
                   help="JSON options of the labelmaps: source, e.g. "
                        "'{\"same_contrast_probability\": 0.5, \"max_maps\": 13}'")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights (bundled name or file; same architecture "
                        "and configuration): fine-tuning")
    p.add_argument("--distill-from", metavar="MODEL",
                   help="distillation (EOIR): the trained model learns to reproduce the "
                        "teacher's displacement. A model (bundled name or file at the same working "
                        "spacing; labelmaps: data): its displacement for the same anatomy in one "
                        "contrast while the student sees two contrasts. 'optimisation': the "
                        "multi-scale optimisation's field for each pair (any data), solved on "
                        "the pair's own grid")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the distillation term (squared voxel distance to the teacher's "
                        "displacement; default 1); needs --distill-from")
    p.add_argument("--checkpoint-every", type=int, default=TRAIN.checkpoint_every,
                   help="iterations between checkpoints (default: %(default)s)")
    p.add_argument("--validate-every", type=int, default=TRAIN.validate_every,
                   help="iterations between validations (default: %(default)s)")
    p.add_argument("--validation-pairs", type=int, default=TRAIN.validation_pairs,
                   help="pairs drawn once for validation (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=TRAIN.log_every,
                   help="iterations between log rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=TRAIN.seed, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=TRAIN.device, choices=DEVICES)
    p.add_argument("--threads", type=int, default=TRAIN.threads, help="CPU threads (default: torch's)")
    p.add_argument("--name", default=TRAIN.name, help="model name in the card")
    p.add_argument("--description", default=TRAIN.description, help="one-line description in the card")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start again in a used folder")
    return p


@raise_on_signals()
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()
    from EOIRRegistrationLib.core.qa import STANDARD_30_LABELS, SYNTHSEG_COMPARABLE_LABELS
    from EOIRRegistrationLib.training.trainer import train
    try:
        model_config = json.loads(args.model_config)
        if args.model == "eoir":
            model_config.setdefault("channels", args.channels or TRAIN.model_config["channels"])
            model_config.setdefault("levels", args.levels or EOIRConfig.levels)
        elif args.channels or args.levels:
            raise ValueError("--channels/--levels configure EOIR; give other architectures' "
                             "options with --model-config")
        if args.distill_weight is not None and not args.distill_from:
            raise ValueError("--distill-weight needs --distill-from (the teacher model)")
        label_values = {"all": (), "standard30": STANDARD_30_LABELS,
                        "standard27": SYNTHSEG_COMPARABLE_LABELS}[args.dice_labels]
        cfg = TrainConfig(
            output_dir=args.output_dir, architecture=args.model, model_config=model_config,
            data=args.data, shape=tuple(args.shape), working_spacing_mm=tuple(args.working_spacing),
            objective={"similarity": args.similarity, "regularization_weight": args.reg_weight,
                       "dice_weight": args.dice_weight, "label_values": label_values,
                       "distill_weight": (0.0 if not args.distill_from
                                          else 1.0 if args.distill_weight is None
                                          else args.distill_weight)},
            source_options=json.loads(args.data_options), init_from=args.init_from,
            distill_from=args.distill_from,
            iterations=args.iterations, batch_size=args.batch, learning_rate=args.lr,
            poly_decay=args.poly_decay,
            checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
            validation_pairs=args.validation_pairs, log_every=args.log_every, seed=args.seed, device=args.device,
            threads=args.threads, name=args.name, description=args.description)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (EOIRError, ValueError, json.JSONDecodeError) as exc:
        print(f"eoir-train: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # checkpoints are written whole (modelfile.atomic_torch_save)
        print(f"eoir-train: interrupted; {args.output_dir} keeps the last checkpoint "
              "(--resume continues from it)", file=sys.stderr)
        return exc.exit_code
    return 0
