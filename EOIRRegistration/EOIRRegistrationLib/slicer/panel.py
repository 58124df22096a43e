"""The panel's decisions without Qt: its choices as the engine's options, and the texts it shows
while a run goes on and when it ends. ``EOIRRegistration.py`` puts them into widgets."""
from __future__ import annotations

from EOIRRegistrationLib.core.errors import RegistrationCancelled
from EOIRRegistrationLib.engine.options import RegistrationOptions

DEFAULTS = RegistrationOptions()


def optionsFromParameterNode(p) -> RegistrationOptions:
    """The engine's options from the panel's choices (the panel's "unset" values: working
    spacing 0, refine iterations -1, refine seconds 0, similarity "auto")."""
    window = None
    if p.useIntensityWindow:
        window = ((p.fixedWindowMin, p.fixedWindowMax), (p.movingWindowMin, p.movingWindowMax))
    return RegistrationOptions(
        model=p.model or DEFAULTS.model, device=p.device,
        working_spacing=p.workingSpacing if p.workingSpacing > 0 else None,
        intensity_window=window, initial_alignment=p.initialAlignment, contrast=p.contrast,
        preset=p.preset,
        refine_iterations=None if p.refineIterations < 0 else p.refineIterations,
        refine_seconds=p.refineSeconds if p.refineSeconds > 0 else None,
        refine_similarity=None if p.refineSimilarity == "auto" else p.refineSimilarity,
        inverse=bool(p.computeInverse))


def progressText(stage: str, elapsed: float, remaining: float | None) -> str:
    estimate = f", about {remaining:.0f} s left" if remaining is not None else ""
    return f"{stage} ({elapsed:.0f} s{estimate})"


def failureText(error: BaseException) -> tuple[str, str | None]:
    """(status line, message box text or None) for a run that ended with ``error``."""
    from EOIRRegistrationLib.slicer.logic import describeError

    if isinstance(error, RegistrationCancelled):
        return "Cancelled. The scene was left as it was.", None
    return "Registration failed.", f"Registration failed: {describeError(error)}"


def resultTexts(outputs, seconds: float) -> dict:
    """The Results section's label texts and the status line after a run."""
    result = outputs.result
    qa = result.qa
    method = f" {result.method[:1].upper()}{result.method[1:]}."
    return {
        "foldingValueLabel": f"{qa['folding_percent']:.4f} % of voxels",
        "sdlogjValueLabel": f"{qa['sdlogj']:.4f}",
        "jacobianRangeValueLabel": f"{qa['jacobian_min']:.3f} / {qa['jacobian_max']:.3f}",
        "runValueLabel": f"{result.model_name} on {result.device}, {seconds:.1f} s",
        "statusLabel": (f"Done: '{outputs.transformNode.GetName()}' holds the result; the moving "
                        f"volume is shown through it.{method}"
                        + "".join(f" WARNING: {w}." for w in result.warnings)),
    }


def modelChoices(loadFileData: str) -> list[tuple[str, str, str]]:
    """(label, data, tooltip) of the model combo box: the bundled models with their card's
    one-line description (read without torch, the default first), then "Load model file..."."""
    from EOIRRegistrationLib.slicer.catalog import listBundledModels

    choices = [(m.name, m.name, m.description) for m in listBundledModels()]
    if not choices:
        choices = [("default", "default", "The engine's default model")]
    return choices + [("Load model file...", loadFileData, "A model trained with eoir-train")]


def modelDescription(model: str, choices) -> str:
    """The line under the model combo box for ``model`` (a bundled name or a file path)."""
    described = {data: tip for _, data, tip in choices}
    if model in described:
        return described[model]
    return f"Model file: {model}" if model and ("/" in model or "\\" in model) else ""


def gpuTooltip(gpu: bool) -> str:
    return ("Run on the GPU (CUDA)." if gpu else
            "No CUDA GPU was found on this computer (no NVIDIA driver); the CPU is used. A "
            "registration takes longer on the CPU but gives the same result.")


def torchReady(errorDisplay) -> tuple[bool, str]:
    """Whether torch can be used, offering to install it through the PyTorch extension (the only
    thing ever installed); (ready, status line when not). ``errorDisplay(text)`` shows why
    not when the PyTorch extension itself is missing."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return True, ""
    try:
        import PyTorchUtils
    except ImportError:
        errorDisplay("EOIR Registration needs PyTorch. Install the 'PyTorch' extension from the "
                     "Extensions Manager, restart Slicer, and press Apply again.")
        return False, "PyTorch is not installed; registration not started."
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return True, ""
    if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1") is None:
        return False, "PyTorch is not installed; registration not started."
    return True, ""


def labelChoices(combo, labels: dict, tips: dict | None = None, toolTipRole=None) -> None:
    """Readable labels (and per-item tooltips) on a combo box that the parameter node connector
    fills with the engine's names, in the order of ``labels``, and reads by index."""
    for index, value in enumerate(labels):
        if index < combo.count:
            combo.setItemText(index, labels[value])
            if tips is not None:
                combo.setItemData(index, tips[value], toolTipRole)
