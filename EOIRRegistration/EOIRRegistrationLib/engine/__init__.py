"""The registration engine: ``RegistrationOptions`` in (``options``), ``RegistrationResult`` out
(``result``), and between them the pipeline (``pipeline.register``), the initial alignment, the
contrast test, the per-pair optimisation (``refine``), model files and devices.

May import: ``core`` and ``models``. ``options`` and ``result`` import no torch (the Slicer
panel uses them before torch is installed); the other modules import torch.
"""
