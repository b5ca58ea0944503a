"""The one C extension (prewarm._landing); everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("prewarm._landing", ["prewarm/_landing.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
