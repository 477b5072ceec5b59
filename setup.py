"""Packaging for greenserve; tool configuration lives in pyproject.toml."""

import re
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

HERE = Path(__file__).parent
GEVENT = "gevent>=24.2.1,<27"
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "greenserve" / "_version.py").read_text(), re.M
).group(1)


class OptionalBuildExt(build_ext):
    """Builds the optional accelerator (greenserve._speedups, docs/speedups.md); without a
    compiler or Python's headers greenserve installs as pure Python, with one line said."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            self.warn(f"greenserve._speedups not built, greenserve stays pure Python: {exc}")
            self.extensions = []

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            self.warn(f"{ext.name} not built, greenserve stays pure Python: {exc}")
            # What was not built is not copied in place nor listed among the outputs.
            self.extensions = [e for e in self.extensions if e is not ext]


setup(
    name="greenserve",
    version=VERSION,
    description="Servers and connections for gevent: Async's Tcp.Server, Eio's Net and Switch",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["greenserve", "greenserve.*"]),
    package_data={"greenserve": ["py.typed"]},
    ext_modules=[Extension("greenserve._speedups", ["greenserve/_speedups.c"])],
    cmdclass={"build_ext": OptionalBuildExt},
    # The range tox's gevent-oldest and gevent-newest environments test: 24.2.1 is the
    # oldest gevent >= 24 with wheels for Python 3.11 (24.2.0 was never released);
    # < 27: a new major version is tested before it is allowed.
    install_requires=[GEVENT, "greenlet>=3", "exceptiongroup>=1.1; python_version<'3.11'"],
    extras_require={
        "gunicorn": ["gunicorn>=22"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "cryptography>=41",
                 "gunicorn>=22"],
        # What CI and tox run besides the tests: the linters and tox itself.
        "dev": ["ruff>=0.4", "mypy>=1.8", "tox>=4"],
    },
    entry_points={"console_scripts": ["greenserve = greenserve.cli:main"]},
    classifiers=[
        "Framework :: gevent",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
    ],
)
