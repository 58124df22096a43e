"""Registration in a Slicer scene without Qt: the MRML bridge (``bridge``: volumes and transforms
between MRML's RAS and the engine's LPS), the three steps of a run (``logic``), the scene
outputs and their transaction (``outputs``, ``transaction``), the thread and process runners
(``runners``) with the worker process (``worker``), the torch-free model list (``catalog``) and
the self-test pair (``selftest``). Runs inside Slicer and with the ``slicer-core`` wheel.

May import: ``core`` and ``engine`` (the engine's pipeline only inside functions: torch is
loaded in the worker process, never when Slicer loads the module). Nothing of Qt.
"""
