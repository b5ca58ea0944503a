"""The C extensions (hot paths with a Python reference beside them); the rest is in pyproject.toml."""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(ext_modules=[
    Extension("prewarm._landing", ["prewarm/_landing.c"], extra_compile_args=_FLAGS),  # prewarm.landing
    Extension("prewarm._ztoc", ["prewarm/_ztoc.c"], extra_compile_args=_FLAGS),  # prewarm.ztoc
])
