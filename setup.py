"""The build steps that pyproject.toml cannot declare: the C extensions and the gRPC code.

The C extensions are hot paths with a Python reference beside them.  The gRPC modules of
the snapshotter shim (``*_pb2.py``, ``*_pb2_grpc.py``, ``*_pb2.pyi``) are generated from
the ``.proto`` files under ``prewarm/runtime/shim/_proto`` by ``build_protos``, a
sub-command of ``build``: a wheel gets them in its build tree, an editable install
(``pip install -e .``) gets them next to the ``.proto`` files, and so does
``python setup.py build_protos --inplace`` (what ``scripts/gen-protos`` runs).  They are
never checked in: generated code must match the grpcio and protobuf it was made for,
which pyproject.toml pins together (``grpcio-tools`` at build time, ``grpcio`` and
``protobuf`` at run time).

The repository root is the proto include root, so the generated modules import each
other as ``prewarm.runtime.shim._proto.<...>``; the proto *packages*
(``containerd.services.snapshots.v1``, ``runtime.v1``) are containerd's and
Kubernetes', which is what the wire needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from setuptools import Command, Extension, setup
from setuptools.command.build import build
from setuptools.errors import ExecError

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_ROOT = Path(__file__).resolve().parent
_PROTO_DIR = "prewarm/runtime/shim/_proto"


class build_protos(Command):
    """Run grpc_tools.protoc on every ``.proto`` of the shim.

    Output goes to ``build_lib`` (a wheel), or beside the sources with ``--inplace`` or
    in an editable install, where setuptools sets ``editable_mode``.
    """

    description = "generate the gRPC Python modules of the snapshotter shim"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = [
        ("build-lib=", "d", "directory to write the generated modules to"),
        ("inplace", "i", "write them beside the .proto files (for development)"),
    ]
    boolean_options: ClassVar[list[str]] = ["inplace"]

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.inplace = False
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _protos(self) -> list[str]:
        """The ``.proto`` files, relative to the include root, in a stable order."""
        protos = sorted(p.relative_to(_ROOT).as_posix() for p in (_ROOT / _PROTO_DIR).rglob("*.proto"))
        if not protos:
            raise ExecError(f"build_protos: no .proto files under {_ROOT / _PROTO_DIR}")
        return protos

    def _out_dir(self) -> str:
        return str(_ROOT) if (self.inplace or self.editable_mode) else str(self.build_lib)

    def run(self) -> None:
        # Imported here: only building needs grpcio-tools (a build requirement, and in the
        # test extra for scripts/gen-protos); the installed package never does.
        try:
            import grpc_tools
            from grpc_tools import protoc
        except ImportError as err:
            raise ExecError(
                "build_protos: grpcio-tools is not installed; it is a build requirement in "
                "pyproject.toml (pip installs it when building), or run: pip install grpcio-tools"
            ) from err
        out = self._out_dir()
        os.makedirs(out, exist_ok=True)
        # protoc resolves google/protobuf/*.proto (empty.proto, timestamp.proto) from the
        # copy that grpcio-tools ships; `python -m grpc_tools.protoc` adds it by itself,
        # protoc.main() does not.
        well_known = str(Path(grpc_tools.__file__).parent / "_proto")
        args = [
            "grpc_tools.protoc", f"-I{_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
            # Absolute paths: protoc names each file by its path under the include root.
            *(str(_ROOT / proto) for proto in self._protos()),
        ]
        self.announce(f"generating gRPC modules into {out}", level=2)
        code = protoc.main(args)
        if code != 0:
            raise ExecError(f"build_protos: grpc_tools.protoc failed with exit code {code}")

    def get_outputs(self) -> list[str]:
        """The generated files, for editable installs and the wheel's RECORD."""
        out = Path(self._out_dir())
        files = []
        for proto in self._protos():
            stem = proto[: -len(".proto")]
            files += [str(out / f"{stem}{suffix}") for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")]
        return files

    def get_output_mapping(self) -> dict[str, str]:
        """Empty: the outputs are generated, not copies of a source file."""
        return {}

    def get_source_files(self) -> list[str]:
        return self._protos()


class build_with_protos(build):
    """``build`` with ``build_protos`` as its last sub-command.

    Last, after build_py: generated modules left in a development checkout (which
    build_py copies like any module) are then overwritten by fresh ones.
    """

    sub_commands: ClassVar[list[tuple[str, object]]] = [*build.sub_commands, ("build_protos", None)]


setup(
    ext_modules=[
        Extension("prewarm.store._landing", ["prewarm/store/_landing.c"],
                  depends=["prewarm/index/_flatbuf.h", "prewarm/index/_tarheader.h"],
                  extra_compile_args=_FLAGS),  # prewarm.store.landing
        Extension("prewarm.index._tarindex", ["prewarm/index/_tarindex.c"], depends=["prewarm/index/_tarheader.h"],
                  extra_compile_args=_FLAGS),  # prewarm.index.tarindex
        Extension("prewarm.index._ztoc", ["prewarm/index/_ztoc.c"], depends=["prewarm/index/_flatbuf.h"],
                  extra_compile_args=_FLAGS),  # prewarm.index.ztoc
        Extension("prewarm.store._tree", ["prewarm/store/_tree.c"], depends=["prewarm/index/_flatbuf.h"],
                  extra_compile_args=_FLAGS),  # prewarm.store.layerfs
    ],
    cmdclass={"build": build_with_protos, "build_protos": build_protos},
)
