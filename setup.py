"""Build hook; all metadata lives in pyproject.toml.

The repository root is the package directory of ``lowmem``, so setuptools would ship this
file as ``lowmem/setup.py``; the build_py override leaves it (a build script, not library
code) out of wheels. tests/ is never shipped because it is not in the package list.
"""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithoutSetupScript(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "lowmem" and m[1] == "setup")]


setup(cmdclass={"build_py": BuildPyWithoutSetupScript})
