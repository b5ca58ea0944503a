"""The C extensions (hot paths with a Python reference beside them); the rest is in pyproject.toml."""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(ext_modules=[
    Extension("prewarm.store._landing", ["prewarm/store/_landing.c"], extra_compile_args=_FLAGS),  # prewarm.store.landing
    Extension("prewarm.index._ztoc", ["prewarm/index/_ztoc.c"], extra_compile_args=_FLAGS),  # prewarm.index.ztoc
])
