"""Ship the top-level ``conf/`` tree inside the wheel as ``pse_lightning/conf``.

The configs live at the repository root (the project's layout), but an installed wheel run
from another directory must still find them, so the build copies them into the package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).parent / "conf"
        target = Path(self.build_lib) / "pse_lightning" / "conf"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)


setup(cmdclass={"build_py": BuildPyWithConf})
