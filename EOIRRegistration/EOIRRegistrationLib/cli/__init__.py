"""The command line, one module per command: ``register`` (eoir-register), ``batch``
(eoir-batch, a cohort: ``batch_manifest``, ``batch_pair``, ``batch_summary``), ``train``
(eoir-train), ``models`` (eoir-models), ``demo``, and ``main`` (``python -m
EOIRRegistrationLib``); ``outputs``, ``files`` and ``overview`` write what a command produces.

May import: ``core``, ``engine``, ``models`` and ``training``.
"""
