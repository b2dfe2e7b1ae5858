"""Compile the BPF objects into the package when pip builds it.

`make bpf` is the one place that knows how to compile them; this hook just
runs it so `pip install .` ships working objects.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithBpf(build_py):
    def run(self):
        subprocess.run(["make", "-s", "bpf"], cwd=Path(__file__).parent, check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
