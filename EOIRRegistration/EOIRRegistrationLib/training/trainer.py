"""The training loop behind ``eoir-train``: deterministic, resumable, logged, CPU or GPU.

Files in the output folder:
* ``checkpoint.pt`` — model payload + optimiser state + iteration + RNG state (weights-only load),
  written every ``checkpoint_every`` iterations and at the end (resume continues from it);
* ``log.csv`` — one row per logged iteration (loss terms, seconds) and validation figures;
* ``model.pt`` — the final model file with its card (what ``eoir-register --model`` takes).
"""
from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from EOIRRegistrationLib.core import metrics, qa, spatial
from EOIRRegistrationLib.core.errors import InputError, ModelFileError
from EOIRRegistrationLib.core.intensity import DEFAULT_NORMALIZATION
from EOIRRegistrationLib.engine.devices import resolve_device
from EOIRRegistrationLib.engine.modelfile import atomic_torch_save, model_payload, save_model
from EOIRRegistrationLib.models import build_model
from EOIRRegistrationLib.training import optimiser_teacher
from EOIRRegistrationLib.training.data import FileSource, SyntheticSource
from EOIRRegistrationLib.training.objectives import OBJECTIVES, SIMILARITIES, ObjectiveConfig
from EOIRRegistrationLib.training.synthetic import SyntheticConfig

CHECKPOINT_FORMAT = "eoir-registration-checkpoint"
LOG_FIELDS = ["iteration", "seconds", "lr", "loss", "similarity", "regularity",
              "val_dice_before", "val_dice_after", "val_folding_percent"]


@dataclass
class TrainConfig:
    output_dir: str
    architecture: str = "eoir"
    model_config: dict = field(default_factory=lambda: {"channels": 8})
    data: str = "synthetic"   # "synthetic", "labelmaps:FOLDER", a folder, or a Learn2Reg JSON
    shape: tuple = (64, 64, 64)             # training crop, array order (D, H, W)
    working_spacing_mm: tuple = (2.0, 2.0, 2.0)
    synthetic: dict = field(default_factory=dict)   # SyntheticConfig overrides
    source_options: dict = field(default_factory=dict)  # LabelMapSource options (labelmaps: data)
    init_from: str | None = None  # model file or bundled name to start from (fine-tuning)
    # Distillation teacher: a model (contrast distillation, labelmaps: data: its displacement for
    # the moving anatomy rendered in the fixed image's contrast) or "optimisation" (the
    # multi-scale optimisation, optimiser_teacher.py); the target of ObjectiveConfig.distill_weight.
    distill_from: str | None = None
    objective: dict = field(default_factory=dict)   # ObjectiveConfig overrides
    iterations: int = 2000
    batch_size: int = 1   # pairs per step, stacked into one (B, ...) batch
    learning_rate: float = 1e-4
    poly_decay: bool = False
    checkpoint_every: int = 100
    validate_every: int = 250
    validation_pairs: int = 4
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    name: str = "eoir-model"
    description: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["working_spacing_mm"] = list(self.shape), list(self.working_spacing_mm)
        return d


def make_source(cfg: TrainConfig):
    if cfg.source_options and not cfg.data.startswith("labelmaps:"):
        raise InputError("source options (--data-options) apply to labelmaps: data only")
    if cfg.data == "synthetic":
        return SyntheticSource(SyntheticConfig(**{"shape": tuple(cfg.shape), **cfg.synthetic}))
    if cfg.data.startswith("labelmaps:"):
        from EOIRRegistrationLib.training.labelmaps import LabelMapSource
        try:
            return LabelMapSource(cfg.data[len("labelmaps:"):], shape=cfg.shape,
                                  spacing=cfg.working_spacing_mm[0], **cfg.source_options)
        except TypeError as exc:  # an unknown option name
            raise InputError(f"bad labelmaps: data option: {exc}") from exc
    return FileSource(cfg.data, shape=cfg.shape, spacing=cfg.working_spacing_mm,
                      normalization=DEFAULT_NORMALIZATION)


def _to(pair: dict, device) -> dict:
    return {k: v.to(device) for k, v in pair.items()}


def _stack(pairs: list[dict]) -> dict:
    """One batch from pairs of one crop shape: each entry concatenated along the batch axis.
    Every loss is a mean over the batch, so a batch's objective is the mean of its pairs'.
    Entries some pairs lack (labels of a folder where only some images have them) are left out
    of that batch."""
    keys = [k for k in pairs[0] if all(k in p for p in pairs)]
    return {k: torch.cat([p[k] for p in pairs]) for k in keys}


@torch.no_grad()
def validate(model, pairs: list[dict], device, label_values=()) -> dict:
    """Mean label Dice before/after (over ``label_values``, or every label of the fixed map) and
    % folding (voxel Jacobian) over validation pairs."""
    model.eval()
    before, after, fold = [], [], []
    for pair in pairs:
        p = _to(pair, device)
        u = model(p["fixed"], p["moving"])
        det = metrics.jacobian_determinant_voxel(u)
        fold.append(100.0 * qa.folding_fraction(det.cpu()))
        if "fixed_labels" in p:
            fl = p["fixed_labels"][0, 0].cpu().numpy()
            ml = p["moving_labels"]
            warped = spatial.warp(ml.float(), u, mode="nearest").long()[0, 0].cpu().numpy()
            values = list(label_values) or [int(v) for v in torch.unique(p["fixed_labels"])
                                            if v != 0]
            before.append(_mean(qa.dice(fl, ml[0, 0].cpu().numpy(), values)))
            after.append(_mean(qa.dice(fl, warped, values)))
    model.train()
    return {"val_dice_before": _avg(before), "val_dice_after": _avg(after),
            "val_folding_percent": _avg(fold)}


def _mean(d: dict) -> float:
    vals = [v for v in d.values() if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _avg(xs):
    return sum(xs) / len(xs) if xs else float("nan")


class _Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.start = total, stream, time.time()

    def update(self, it: int, first: int, text: str):
        done = it - first
        rate = (time.time() - self.start) / max(done, 1)
        eta = rate * (self.total - it)
        bar = "#" * int(30 * it / self.total)
        print(f"[{bar:<30}] {it}/{self.total} {text} | {rate:.2f} s/it, ETA {eta / 60:.1f} min",
              file=self.stream, flush=True)


def _truncate_log(log_path: Path, last_iteration: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (they will be redone)."""
    if not log_path.exists():
        return
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(log_path, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["iteration"]) <= last_iteration)


def _load_checkpoint(path: Path) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot resume: {path} is not a readable checkpoint ({exc})") from exc
    if not isinstance(ck, dict) or ck.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"cannot resume: {path} is not an eoir-train checkpoint")
    return ck


def _load_initial_weights(model, cfg: TrainConfig) -> None:
    """Start from a trained model's weights (fine-tuning); its architecture and configuration
    must be the ones being trained."""
    from EOIRRegistrationLib.engine.modelfile import resolve_model
    start = resolve_model(cfg.init_from)
    if start.architecture != cfg.architecture or start.model.config() != model.config():
        raise InputError(f"--init-from {cfg.init_from}: that model is {start.architecture} "
                         f"{start.model.config()}, this run trains {cfg.architecture} "
                         f"{model.config()}; pass the same --model/--channels/--levels/"
                         "--model-config")
    model.load_state_dict(start.model.state_dict())


def _load_teacher(cfg: TrainConfig, source, device):
    """The distillation teacher (a frozen model, or the optimisation), or None."""
    if not cfg.distill_from:
        if ObjectiveConfig(**cfg.objective).distill_weight > 0:
            raise InputError("a distillation weight needs a teacher (--distill-from)")
        return None
    if ObjectiveConfig(**cfg.objective).distill_weight <= 0:
        raise InputError("--distill-from needs a positive --distill-weight")
    if cfg.architecture != "eoir":
        raise InputError("--distill-from: distillation is implemented for EOIR training")
    if cfg.distill_from == optimiser_teacher.NAME:
        return optimiser_teacher.OptimisationTeacher(cfg.working_spacing_mm)
    from EOIRRegistrationLib.engine.modelfile import resolve_model
    if not getattr(source, "renders_moving_in_fixed_contrast", False):
        raise InputError("--distill-from needs labelmaps: data (the teacher sees the moving "
                         "anatomy rendered in the fixed image's contrast)")
    teacher = resolve_model(cfg.distill_from)
    spacing = list(teacher.working_spacing)
    if spacing != [float(s) for s in cfg.working_spacing_mm]:
        raise InputError(f"--distill-from {cfg.distill_from}: the teacher works at {spacing} mm, "
                         f"this run at {list(cfg.working_spacing_mm)} mm")
    model = teacher.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_settings(cfg: TrainConfig, obj: ObjectiveConfig) -> None:
    """Refuses settings that would fail part-way or train nothing, before anything is written."""
    if int(cfg.iterations) != cfg.iterations or cfg.iterations < 0:  # 0: the starting model, written
        raise InputError(f"the iterations must be a whole number, 0 or more, got {cfg.iterations}")
    counts = {"batch size": cfg.batch_size,
              "checkpoint interval": cfg.checkpoint_every, "validation interval": cfg.validate_every,
              "validation pairs": cfg.validation_pairs, "log interval": cfg.log_every}
    for what, n in counts.items():
        if int(n) != n or n < 1:
            raise InputError(f"the {what} must be a whole number of at least 1, got {n}")
    if len(cfg.shape) != 3 or any(int(n) != n or n < 1 for n in cfg.shape):
        raise InputError(f"the training crop must be three sizes (D H W), got {list(cfg.shape)}")
    if len(cfg.working_spacing_mm) != 3 or not all(0 < s < math.inf for s in cfg.working_spacing_mm):
        raise InputError("the working spacing must be three positive sizes in mm (x y z), got "
                         f"{list(cfg.working_spacing_mm)}")
    if not 0 < cfg.learning_rate < math.inf:
        raise InputError(f"the learning rate must be positive, got {cfg.learning_rate}")
    if obj.similarity not in SIMILARITIES or (obj.similarity == "none" and cfg.architecture != "eoir"):
        known = SIMILARITIES if cfg.architecture == "eoir" else tuple(s for s in SIMILARITIES if s != "none")
        raise InputError(f"{cfg.architecture} trains with the similarity {' or '.join(known)}, "
                         f"not {obj.similarity!r}")
    weights = {"regularization": obj.regularization_weight, "Dice": obj.dice_weight,
               "distillation": obj.distill_weight}
    for what, w in weights.items():
        if not 0 <= w < math.inf:
            raise InputError(f"the {what} weight must be zero or more, got {w}")
    if obj.similarity == "none" and obj.dice_weight <= 0 and obj.distill_weight <= 0:
        raise InputError("with the similarity 'none' only the Dice and distillation terms train the "
                         "network: give one a weight (--dice-weight, --distill-from)")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          stream=sys.stderr) -> Path:
    """Run training; returns the path of the final model file."""
    out = Path(cfg.output_dir)
    ckpt_path, log_path, model_path = out / "checkpoint.pt", out / "log.csv", out / "model.pt"
    if ckpt_path.exists() and not (resume or overwrite):
        raise InputError(f"{out} already holds a training run; pass --resume to continue it or "
                         "--overwrite to start again")
    obj_cfg = ObjectiveConfig(**cfg.objective)
    _check_settings(cfg, obj_cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.architecture, cfg.model_config)
    try:
        model.check_shape(tuple(cfg.shape))
    except ValueError as exc:
        raise InputError(f"the training crop {list(cfg.shape)} (--shape) does not suit the network: "
                         f"{exc}") from None
    if cfg.init_from and not (resume and ckpt_path.exists()):
        _load_initial_weights(model, cfg)
    model = model.to(device)
    if device.type == "cpu":
        # oneDNN's 3D convolution backward is several times faster in channels-last layout.
        model = model.to(memory_format=torch.channels_last_3d)
    objective = OBJECTIVES[cfg.architecture]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, amsgrad=True)
    # Data and teacher first: a refused source or teacher leaves the output folder untouched.
    source = make_source(cfg)
    teacher = _load_teacher(cfg, source, device)
    start = 0
    if resume and ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"]["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator_state"])
        torch.set_rng_state(ck["torch_rng_state"])
        start = int(ck["iteration"])
        _truncate_log(log_path, start)
        print(f"resuming from iteration {start}", file=stream)
    elif overwrite or not log_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    val_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    val_pairs = [source.sample(val_gen) for _ in range(cfg.validation_pairs)]
    print(f"training {cfg.architecture} {cfg.model_config} on {source.describe()}, device {device}, "
          f"iterations {start}..{cfg.iterations}", file=stream)
    progress = _Progress(cfg.iterations, stream)
    last_val: dict = {}

    def save_checkpoint(it: int):
        atomic_torch_save({"checkpoint_format": CHECKPOINT_FORMAT, "iteration": it,
                           "model": model_payload(model, {}), "optimizer": opt.state_dict(),
                           "generator_state": gen.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "train_config": cfg.to_dict()}, ckpt_path)

    model.train()
    t0 = time.time()
    for it in range(start + 1, cfg.iterations + 1):
        lr = cfg.learning_rate * ((1 - (it - 1) / cfg.iterations) ** 0.9 if cfg.poly_decay else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        pair = _to(_stack([source.sample(gen) for _ in range(cfg.batch_size)]), device)
        # Sources with a separate similarity target (label maps) pass it on.
        extra = {k: pair[k] for k in ("moving_similarity",) if k in pair}
        if teacher is not None:
            with torch.no_grad():
                extra["teacher_displacement"] = teacher(
                    pair["fixed"], pair.get("moving_similarity", pair["moving"]))
        terms = objective(model, pair["fixed"], pair["moving"], obj_cfg,
                          pair.get("fixed_labels"), pair.get("moving_labels"), **extra)
        if not torch.isfinite(terms.total):
            raise FloatingPointError(f"non-finite loss at iteration {it}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        row = None
        if it % cfg.log_every == 0 or it == cfg.iterations:
            row = {"iteration": it, "seconds": round(time.time() - t0, 2), "lr": lr,
                   "loss": terms.total.item(), "similarity": terms.similarity.item(),
                   "regularity": terms.regularity.item()}
        if it % cfg.validate_every == 0 or it == cfg.iterations:
            last_val = validate(model, val_pairs, device, obj_cfg.label_values)
            row = {**(row or {"iteration": it, "seconds": round(time.time() - t0, 2)}), **last_val}
        if row is not None:
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow(row)
            text = f"loss {row.get('loss', float('nan')):.4f}"
            if "val_dice_after" in row:
                text += (f" | val Dice {row['val_dice_before']:.3f} -> {row['val_dice_after']:.3f},"
                         f" folding {row['val_folding_percent']:.3f}%")
            progress.update(it, start, text)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save_checkpoint(it)
    if not last_val:  # resumed at or past the last iteration: validate what we have
        last_val = validate(model, val_pairs, device, obj_cfg.label_values)
    card = {
        "name": cfg.name,
        "description": cfg.description or f"{cfg.architecture} trained on {source.describe()}",
        "architecture": cfg.architecture,
        "training_data": source.describe(),
        "training_config": cfg.to_dict(),
        "objective": obj_cfg.to_dict(),
        "working_spacing_mm": list(cfg.working_spacing_mm),
        "intensity_normalization": dict(DEFAULT_NORMALIZATION),
        "validation": {k: round(v, 4) for k, v in last_val.items()},
        "trained_on": date.today().isoformat(),
    }
    save_model(model_path, model.cpu(), card)
    print(f"model written to {model_path}", file=stream)
    return model_path
