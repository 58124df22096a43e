"""Training: synthetic, label-map and file-based pair sources, objectives, the training loop, and
the phantom pair of the demo and the tests (rendered by the synthetic generator).

May import: ``core``, ``models`` and ``engine`` (model files, devices).
"""
