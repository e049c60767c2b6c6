"""Build script. The package is pure Python today; the CUDA extension joins here with the CUDA backend."""
from setuptools import setup

setup()
