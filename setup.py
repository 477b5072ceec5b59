"""Packaging for greenserve; tool configuration lives in pyproject.toml."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
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
    install_requires=["gevent>=24", "greenlet>=3", "exceptiongroup>=1.1; python_version<'3.11'"],
    extras_require={
        "gunicorn": ["gunicorn>=22"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "cryptography>=41",
                 "gunicorn>=22"],
    },
    entry_points={"console_scripts": ["greenserve = greenserve.cli:main"]},
    classifiers=[
        "Framework :: gevent",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
    ],
)
