"""EOIRRegistration engine: learned deformable registration (EOIR, GeoReg) for Slicer and the CLI.

Importing the package is cheap (no torch import); the modules import torch when used.
"""
__version__ = "0.1.0"
