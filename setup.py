"""Packaging for greenserve; tool configuration lives in pyproject.toml."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
GEVENT = "gevent>=24.2.1,<27"
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "greenserve" / "_version.py").read_text(), re.M
).group(1)

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
