"""Cross-contrast check: phantom pairs whose moving image is re-rendered in a random contrast.

The fixed image is the phantom of ``training.phantom.make_phantom_pair`` (64^3 at 1.5 mm, smooth known
deformation, no rotation); the moving image gets one random intensity per label (seeded) and a
0.8 mm blur, so the two inputs share anatomy but not contrast. Each pair is registered without
initial alignment with the default settings (``contrast="auto"``), by the network alone, with
LNCC refinement and with MIND-SSC refinement (10 and 50 steps), and by the MIND-SSC refinement
alone (``network=False``, the CLI's ``--no-network``) on the model's working grid and on a
1.5 mm one; prints the mean label Dice of each. Needs no data; asserts nothing.

``--brain``: real anatomy instead (needs the data folder, see MANIFEST.md): the real T1 subject
as fixed image against the held-out label maps 14-16 of ``brain_pairs.py``, rendered T1-like
(the benchmark's own moving images) and T2-like (``brain_pairs.render_t2_like``: white matter
dark, grey matter brighter, CSF bright, per-label jitter, fixed seed). ``bench_brain.py
--t2-pairs`` runs the classical peers on the same T2-like pairs. Each pair is registered with the
defaults (``contrast="auto"``) and with each contrast forced; prints the label Dice over the
standard structures, the seconds, and what "auto" chose on which correlation.

    python benchmarks/bench_cross_contrast.py [--model default] [--seeds 1 2 3] [--threads 2]
    python benchmarks/bench_cross_contrast.py --brain [--data ../shared/data] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "EOIRRegistration"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--brain", action="store_true", help="real-anatomy pairs (needs --data)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--work-dir", default="bench-cross-contrast", help="pair images (--brain)")
    args = ap.parse_args(argv)
    if args.brain:
        return brain(args)
    import numpy as np
    import SimpleITK as sitk
    import torch

    from EOIRRegistrationLib.core import qa
    from EOIRRegistrationLib.engine.modelfile import resolve_model
    from EOIRRegistrationLib.engine.pipeline import register
    from EOIRRegistrationLib.training.phantom import make_phantom_pair

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    pair = make_phantom_pair(seed=3, shape=(64, 64, 64), spacing=(1.5, 1.5, 1.5),
                             rotation=(0, 0, 0), velocity=3.0)
    fl = sitk.GetArrayFromImage(pair.fixed_labels)
    ml = sitk.GetArrayFromImage(pair.moving_labels)
    values = [int(v) for v in np.unique(fl) if v]
    mean_dice = lambda warped: float(np.nanmean(list(qa.dice(fl, warped, values).values())))  # noqa: E731
    identity = mean_dice(sitk.GetArrayFromImage(sitk.Resample(
        pair.moving_labels, pair.fixed, sitk.Transform(), sitk.sitkNearestNeighbor)))
    # (network, refinement options, [working spacing]); refinement steps left out: the
    # engine's default (10 after the network)
    runs = {"default settings (--contrast auto)": (None, None),
            "network only": (True, {"refine_iterations": 0}),
            "network + LNCC refinement 10": (True, {"refine_similarity": "lncc"}),
            "network + MIND-SSC refinement 10": (True, {"refine_similarity": "mind"}),
            "network + MIND-SSC refinement 50": (True, {"refine_iterations": 50,
                                                        "refine_similarity": "mind"}),
            "MIND-SSC refinement 50 alone (--no-network)": (False, {
                "refine_iterations": 50, "refine_similarity": "mind"}),
            "the same on a 1.5 mm working grid": (False, {
                "refine_iterations": 50, "refine_similarity": "mind"}, (1.5, 1.5, 1.5))}
    results = {name: [] for name in runs}
    for seed in args.seeds:
        lut = np.random.default_rng(seed).random(int(ml.max()) + 1) * 1000
        moving = sitk.GetImageFromArray(lut[ml].astype(np.float32))
        moving.CopyInformation(pair.moving)
        moving = sitk.SmoothingRecursiveGaussian(moving, 0.8)
        for name, (network, refine, *spacing) in runs.items():
            kwargs = {} if refine is None else refine
            r = register(pair.fixed, moving, loaded_model=model, moving_labels=pair.moving_labels,
                         initial_alignment="none", network=network,
                         working_spacing=spacing[0] if spacing else None, **kwargs)
            results[name].append(mean_dice(sitk.GetArrayFromImage(r.warped_labels)))
    print(f"model {model.name}; contrast seeds {args.seeds}; label Dice before: {identity:.3f}")
    for name, dice in results.items():
        print(f"  {name:<44} mean {np.mean(dice):.3f}  ({', '.join(f'{d:.3f}' for d in dice)})")
    return 0


def brain(args) -> int:
    import time

    import numpy as np
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from brain_pairs import make_pairs

    from EOIRRegistrationLib.core import qa
    from EOIRRegistrationLib.engine.modelfile import resolve_model
    from EOIRRegistrationLib.engine.pipeline import register

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    pairs = make_pairs(args.data, Path(args.work_dir) / "pairs", misaligned_maps=(),
                       t2_maps=(14, 15, 16))
    fixed = sitk.ReadImage(pairs["fixed"], sitk.sitkFloat32)
    fl = sitk.GetArrayFromImage(sitk.ReadImage(pairs["fixed_labels"]))
    runs = {"default (auto)": "auto", "--contrast same": "same", "--contrast different": "different"}
    rows = []
    for name, paths in sorted(pairs["pairs"].items()):
        labels = sitk.ReadImage(paths["moving_labels"])
        la = sitk.GetArrayFromImage(labels)
        values = [v for v in qa.STANDARD_30_LABELS
                  if v != 24 and v in set(np.unique(fl)) and v in set(np.unique(la))]
        rendering = "T2-like" if name.endswith("-t2") else "T1-like"
        moving = sitk.ReadImage(paths["moving"], sitk.sitkFloat32)
        for run, contrast in runs.items():
            start = time.perf_counter()
            r = register(fixed, moving, loaded_model=model, moving_labels=labels, contrast=contrast)
            seconds = time.perf_counter() - start
            dice = qa.dice(fl, sitk.GetArrayFromImage(r.warped_labels), values)
            rows.append((rendering, run, name, float(np.nanmean(list(dice.values()))), seconds,
                         r.method))
            print(f"  {name} {rendering:<8} {run:<22} Dice {rows[-1][3]:.3f} "
                  f"{seconds:5.1f} s  {r.method}", flush=True)
    print(f"model {model.name}; real T1 subject vs held-out label maps 14-16 rendered T1-like "
          f"and T2-like; mean label Dice / seconds")
    for rendering in ("T1-like", "T2-like"):
        for run in runs:
            sel = [r for r in rows if r[0] == rendering and r[1] == run]
            print(f"  {rendering:<8} {run:<22} Dice {np.mean([r[3] for r in sel]):.3f}  "
                  f"{np.mean([r[4] for r in sel]):5.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
