"""The panel's words: the module's help, the labels and tooltips of its choices. Plain strings
(no Qt); they describe behaviour, not measured seconds (figures live in benchmarks/results.json).
"""

DEVICE_LABELS = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}
#: initial alignment choices (the engine's method names) and their labels in the panel
INITIAL_ALIGNMENT_LABELS = {
    "auto": "Automatic (affine unless already aligned)",
    "none": "None (inputs already aligned)",
    "com": "Centres of mass",
    "rigid": "Rigid",
    "affine": "Affine",
}
#: refinement similarities (the engine's names) and their labels in the panel
REFINE_SIMILARITY_LABELS = {
    "auto": "Follow the contrast",
    "lncc": "LNCC (same contrast)",
    "mind": "MIND-SSC (two contrasts)",
}
REFINE_SIMILARITY_TIPS = {
    "auto": "LNCC when the volumes share one contrast, MIND-SSC when they do not.",
    "lncc": "Local normalised cross-correlation: for two volumes of the same contrast.",
    "mind": "Modality-independent neighbourhood descriptors (MIND-SSC): for T1 and T2, MR and CT.",
}
INITIAL_ALIGNMENT_TIPS = {
    "auto": "Compute an affine alignment (mutual information on a coarse grid) and use it unless "
            "the volumes are already aligned or it does not improve on no alignment.",
    "none": "Use the moving volume as it is (with its linear parent transform, if any).",
    "com": "Translate so the intensity centres of mass coincide.",
    "rigid": "Rotation and translation maximising mutual information.",
    "affine": "Rigid, then a full affine map maximising mutual information.",
}
#: optimisation presets (the engine's names) and their labels in the panel
PRESET_LABELS = {"fast": "Fast", "default": "Default", "accurate": "Accurate"}
PRESET_TIPS = {
    "fast": "Fewer optimisation steps: quicker, a little less accurate.",
    "default": "The balance measured best for accuracy against time.",
    "accurate": "More steps at every scale, each smoothed less: the most accurate, about twice "
                "the time of the default, a less smooth field.",
}
#: contrast choices (the engine's names) and their labels in the panel
CONTRAST_LABELS = {
    "auto": "Automatic (from the volumes)",
    "same": "Same contrast",
    "different": "Different contrasts (e.g. T1 and T2)",
}
CONTRAST_TIPS = {
    "auto": "Decide from the volumes' intensity correlation after the initial alignment; the "
            "result line says which was used.",
    "same": "One contrast (e.g. two T1 scans): the multi-scale LNCC optimisation.",
    "different": "Two contrasts (T1 and T2, MR and CT): the bundled models are single-contrast, "
                 "so the multi-scale optimisation compares MIND-SSC descriptors.",
}


HELP_TEXT = """
<p>Fast deformable registration of a <b>moving</b> volume to a <b>fixed</b> volume: an initial
alignment, then a multi-scale optimisation of the displacement field down to the fixed volume's own
resolution (<i>Optimisation</i>: Fast, Default or Accurate). The bundled encoder-only network
(EOIR) registers in one pass: <i>Refine iterations</i> 0 gives the network alone, the quickest
preview. Before the optimisation it is not run: on real brains its start gained no accuracy and cost
time (the README's benchmark).</p>
<p><b>What to give it:</b> the default <i>Initial alignment</i>, <i>Automatic</i>, computes an
affine alignment first and uses it unless the volumes are already aligned; you can also choose
centres of mass, rigid, affine or none, or pre-align them yourself (e.g. with General Registration
(BRAINS) or Elastix); a linear parent transform of the moving volume is used as the starting point.
Each bundled model states in its card the kind of images it was trained on, the working spacing
(the network's grid; the result is always on the fixed volume's own grid) and how intensities are
normalised. Use <i>Advanced</i> to override the spacing, give intensity windows (e.g. CT in HU) or
set the steps at the finest scale (<i>Refine iterations</i>; empty: the preset's).
<i>Contrasts</i> (Advanced) says whether the two volumes share one: <i>Automatic</i> (the default)
decides from their intensity correlation after the initial alignment; for different contrasts (T1
and T2, MR and CT) the optimisation compares MIND-SSC descriptors instead of intensities. The
status line after a run says which path ran.</p>
<p><b>Outputs:</b> a grid (displacement-field) transform, by default a new one named after the
volumes, with the moving volume placed under it so it shows aligned at once; it stores the
resampling direction (TransformFromParent) and carries the fixed and moving volumes as references.
Save it as .h5 or .nii.gz to use it in ITK, ANTs or elastix. Optional: the Jacobian determinant as
an overlay on the fixed volume (blue: compression, white: volume kept, red: expansion), folding
(det &le; 0) as a red label map, a resampled copy of the moving volume and the moving segmentation
or label map propagated to the fixed volume. The folding percentage, SDlogJ and the range of the
determinant are shown under <i>Results</i> and stored as attributes of the transform.</p>
<p>For scripting and batch use see the README
(<code>EOIRRegistrationLogic().registerVolumes</code>). Please cite EOIR (Chen et al., "Encoder-
Only Image Registration", IEEE TCSVT 2026, arXiv:2509.00451) and, when you use the GeoReg model,
Sideri-Lampretsa, Stolt-Ans&oacute; et al., "Interpretable deformable image registration: a
geometric deep learning perspective" (arXiv:2412.13294).</p>
"""

ACKNOWLEDGEMENT_TEXT = """
This extension re-implements the EOIR and GeoReg methods from their publications; we thank their
authors. It builds on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and SimpleITK.
"""
