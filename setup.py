"""Build script: the pure-Python package, plus the C++/CUDA extension when torch is importable.

``kernels/`` installs as ``fastflow.kernels`` (one top-level import name).
"""

from setuptools import setup

setup(
    packages=[
        "fastflow",
        "fastflow.backends",
        "fastflow.solvers",
        "fastflow.kernels",
    ],
    package_dir={"fastflow.kernels": "kernels"},
)
