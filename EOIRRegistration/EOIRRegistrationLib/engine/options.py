"""``RegistrationOptions``: every choice of a registration run, validated once, defaults spelt once.

The command line, the Slicer panel (its parameter node), the Slicer worker's job file and the
Python API all build this object; the engine reads nothing else. It is frozen and holds plain
values only (strings, numbers, tuples), so ``to_dict`` / ``from_dict`` round-trip it through
JSON. Imports neither torch nor SimpleITK: the Slicer panel and its checks use it before torch
is installed.

Units and conventions: ``working_spacing`` in mm, ITK order (x, y, z); ``intensity_window`` in
the images' own units; ``initial_transform`` a 4x4 homogeneous LPS matrix mapping a fixed-space
point to a moving-space point (the ITK resampling direction, like every output).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from EOIRRegistrationLib.core.errors import InputError

#: the bundled model that "default" names
DEFAULT_MODEL = "eoir-synth-ns8"
DEVICES = ("auto", "cpu", "cuda")
#: automatic (affine unless already aligned), none, centres of mass, rigid, affine
INITIAL_ALIGNMENTS = ("auto", "none", "com", "rigid", "affine")
#: "same": the multi-scale LNCC optimisation; "different": the same on MIND-SSC; "auto": decided
CONTRASTS = ("auto", "same", "different")
#: LNCC (one contrast) or MIND-SSC descriptors (two contrasts)
REFINE_SIMILARITIES = ("lncc", "mind")
#: schedules of the multi-scale optimisation (their scales and steps: ``engine/optimise.py``;
#: their measured accuracy and time: README, Benchmarks)
PRESETS = ("fast", "default", "accurate")
MAX_REFINE_ITERATIONS = 1000
MAX_THREADS = 1024


def _choice(value, allowed, what):
    text = str(value).lower() if value is not None else None
    if text not in allowed:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return text


def _number(value, what) -> float:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be finite, got {value!r}")
    return number


def _whole(value, what, low, high) -> int:
    number = _number(value, what)
    if number != int(number) or not low <= number <= high:
        raise InputError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _spacing(value):
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise InputError(f"the working spacing needs one or three values (mm, x y z), got "
                         f"{len(values)}")
    spacing = tuple(_number(v, "the working spacing") for v in values)
    if min(spacing) <= 0:
        raise InputError(f"the working spacing must be positive (mm), got {spacing}")
    return spacing


def _window(value):
    if value is None:
        return None
    try:
        pairs = [list(pair) for pair in value]
    except TypeError:
        pairs = []
    if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
        raise InputError("the intensity window needs ((fixed low, fixed high), (moving low, "
                         f"moving high)), got {value!r}")
    window = tuple(tuple(_number(v, "an intensity window bound") for v in pair)
                   for pair in pairs)
    for (low, high), role in zip(window, ("fixed", "moving")):
        if not high > low:
            raise InputError(f"the {role} intensity window ({low}, {high}) is empty: its high "
                             "bound must exceed its low bound")
    return window


def _matrix(value):
    if value is None:
        return None
    try:
        rows = [[_number(v, "an initial transform entry") for v in row] for row in value]
    except TypeError:
        rows = []
    if len(rows) != 4 or any(len(row) != 4 for row in rows):
        raise InputError("an initial transform must be a 4x4 homogeneous matrix")
    if rows[3] != [0.0, 0.0, 0.0, 1.0]:
        raise InputError(f"an initial transform's last row must be 0 0 0 1, got {rows[3]}")
    a = rows
    det = (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
           - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
           + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    if abs(det) < 1e-6:
        raise InputError("the initial transform is singular (determinant 0)")
    return tuple(tuple(row) for row in rows)


@dataclass(frozen=True)
class RegistrationOptions:
    """Every choice of one registration. Fields left None are chosen by the engine from the
    model card and the images; the result records what it chose."""

    #: bundled model name ("default": ``DEFAULT_MODEL``) or a model file path
    model: str = "default"
    #: "auto" (a CUDA GPU when there is one), "cpu" or "cuda"
    device: str = "auto"
    #: CPU threads torch may use during the run; None: torch's own choice
    threads: int | None = None
    #: mm (x, y, z) of the grid the model registers on; None: the model card's
    working_spacing: tuple[float, float, float] | None = None
    #: ((fixed low, fixed high), (moving low, moving high)) in image units; None: the card's
    #: normalisation (percentiles)
    intensity_window: tuple[tuple[float, float], tuple[float, float]] | None = None
    #: linear alignment before the deformable step, contained in the output (``INITIAL_ALIGNMENTS``)
    initial_alignment: str = "auto"
    #: a 4x4 LPS matrix (fixed point -> moving point) to start from; overrides initial_alignment
    initial_transform: tuple[tuple[float, ...], ...] | None = None
    #: "auto" (decided from the images after the initial alignment), "same" or "different"
    contrast: str = "auto"
    #: None: the engine's choice (``contrast.network_by_default``: the network alone when the
    #: optimisation is off, or first for two contrasts with a contrast-agnostic model; not
    #: otherwise: the optimisation reaches the same Dice faster without it); False: never;
    #: True: always, its field the optimisation's start
    network: bool | None = None
    #: the multi-scale optimisation's schedule, down to the fixed image's own resolution
    #: (``PRESETS``)
    preset: str = "default"
    #: the optimisation's steps at the finest scale of the preset's schedule (LNCC or MIND-SSC);
    #: None: the preset's; 0: off (the network alone)
    refine_iterations: int | None = None
    #: time budget of the refinement in seconds; None: no limit
    refine_seconds: float | None = None
    #: "lncc" or "mind"; None follows the contrast (LNCC for one, MIND-SSC for two)
    refine_similarity: str | None = None
    #: also compute the inverse map (a moving-space point y -> the fixed-space point y + d'(y),
    #: LPS mm on the moving image's grid, the initial linear part included); fixed labels given
    #: to the engine imply it (they are carried into the moving space through it)
    inverse: bool = False
    #: the network and the optimisation on the fixed image's foreground box only (a CT's body,
    #: not the air around it; ``engine/foreground.py``); False: on the whole fixed grid
    foreground_box: bool = True

    def __post_init__(self):
        model = self.model
        if not isinstance(model, str) or not model.strip():
            raise InputError(f"the model must be a bundled model name or a model file path, got "
                             f"{model!r}")
        checked = {
            "model": model.strip(),
            "device": _choice(self.device, DEVICES, "device"),
            "threads": (None if self.threads is None
                        else _whole(self.threads, "threads", 1, MAX_THREADS)),
            "working_spacing": _spacing(self.working_spacing),
            "intensity_window": _window(self.intensity_window),
            "initial_alignment": _choice(self.initial_alignment, INITIAL_ALIGNMENTS,
                                         "initial alignment"),
            "initial_transform": _matrix(self.initial_transform),
            "contrast": _choice(self.contrast, CONTRASTS, "contrast"),
            "preset": _choice(self.preset, PRESETS, "preset"),
            "refine_iterations": (None if self.refine_iterations is None else _whole(
                self.refine_iterations, "refine iterations", 0, MAX_REFINE_ITERATIONS)),
            "refine_similarity": (None if self.refine_similarity is None else _choice(
                self.refine_similarity, REFINE_SIMILARITIES, "refinement similarity")),
        }
        if self.network is not None and not isinstance(self.network, bool):
            raise InputError(f"network must be True, False or None, got {self.network!r}")
        if not isinstance(self.inverse, bool):
            raise InputError(f"inverse must be True or False, got {self.inverse!r}")
        if not isinstance(self.foreground_box, bool):
            raise InputError(f"foreground_box must be True or False, got {self.foreground_box!r}")
        if self.refine_seconds is not None:
            seconds = _number(self.refine_seconds, "the refinement time budget")
            if seconds <= 0:
                raise InputError("the refinement time budget must be a positive number of "
                                 f"seconds (None: no limit), got {self.refine_seconds!r}")
            checked["refine_seconds"] = seconds
        if checked["refine_iterations"] == 0 and self.network is False:
            raise InputError("without the network the optimisation is the whole registration: "
                             "give it steps (None: the preset's)")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> RegistrationOptions:
        """A copy with ``changes`` applied (and validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InputError(f"unknown registration option(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists)."""
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value
        return {name: plain(value) for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RegistrationOptions:
        """The inverse of :meth:`to_dict`; unknown keys are an error (a job file from another
        version must not be half-understood)."""
        if not isinstance(data, dict):
            raise InputError(f"registration options must be a mapping, got {type(data).__name__}")
        return cls().replace(**data)


def options_of(options: RegistrationOptions | None = None, **changes) -> RegistrationOptions:
    """``options`` (default: all defaults) with keyword ``changes``: the keyword convenience of
    ``register`` and ``registerVolumes``."""
    if options is not None and not isinstance(options, RegistrationOptions):
        raise InputError(f"options must be RegistrationOptions, got {type(options).__name__}")
    return (options or RegistrationOptions()).replace(**changes) if changes else (
        options or RegistrationOptions())
