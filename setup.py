"""Builds the oneDNN convolution extension (csrc/onednn_conv.cc -> models/_onednn_conv*.so).

Everything else about the project is in pyproject.toml. `pip install -e .` runs this with the
build requirements of pyproject.toml's [build-system] installed: jaxlib (XLA's FFI headers),
onednn-devel-cpu-gomp (oneDNN's headers; it brings onednn-cpu-gomp, libdnnl.so.3 to link
against). The extension is optional: where it cannot be built (not x86-64 Linux, no C++
compiler, headers missing) the install goes on without it and models/onednn.py falls back to
XLA's convolutions, saying why once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HEADERS_DIST, RUNTIME_DIST = "onednn-devel-cpu-gomp", "onednn-cpu-gomp"


def _locate(dist: str, name: str) -> Path | None:
    """Returns the installed file of `dist` whose path ends with `name`, if any."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace("\\", "/").endswith(name):
            path = Path(file.locate()).resolve()
            if path.exists():
                return path
    return None


def _note(message: str) -> None:
    print(f"convnets: {message}", file=sys.stderr)


def onednn_extension() -> list[Extension]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        _note(f"oneDNN extension skipped: x86-64 Linux only ({sys.platform} {platform.machine()})")
        return []
    header = _locate(HEADERS_DIST, "include/oneapi/dnnl/dnnl.hpp")
    library = _locate(RUNTIME_DIST, "libdnnl.so.3")
    jaxlib = importlib.util.find_spec("jaxlib")
    ffi_dir = Path(jaxlib.origin).parent / "include" if jaxlib and jaxlib.origin else None
    if header is None or library is None or ffi_dir is None or not ffi_dir.is_dir():
        _note(
            "oneDNN extension skipped: needs the onednn-devel-cpu-gomp, onednn-cpu-gomp and "
            f"jaxlib packages (found: headers {header}, library {library}, FFI headers {ffi_dir})"
        )
        return []
    return [
        Extension(
            "models._onednn_conv",
            sources=["csrc/onednn_conv.cc"],
            include_dirs=[str(header.parents[2]), str(ffi_dir)],
            library_dirs=[str(library.parent)],
            # link libdnnl.so.3 by its soname: the link-time copy lives in pip's temporary build
            # environment; at run time models/onednn.py loads the installed one first
            extra_link_args=[f"-l:{library.name}", "-lgomp"],
            extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
            language="c++",
            optional=True,  # a failed compile warns; the install goes on without it
        )
    ]


class BuildExt(build_ext):
    """build_ext that says where the extension went, or that it was not built."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # never fail the install over the extension
            _note(f"oneDNN extension not built ({e}); XLA's convolutions will be used")


setup(ext_modules=onednn_extension(), cmdclass={"build_ext": BuildExt})
