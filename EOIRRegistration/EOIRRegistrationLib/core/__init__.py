"""Pure functions of registration, free of any front end: the spatial core (voxel grids, warping,
composition, integration), geometry (physical grids, LPS conversions, ITK-exact resampling),
intensity normalisation, losses, metrics and the QA figures, what ITK's NIfTI reader hides
(``nifti_data``: truncated data, NaN), and the project's error classes.

May import: nothing of this package outside ``core``. ``errors``, ``qa`` and ``nifti_data`` import
neither torch nor scipy; the other modules import torch.
"""
