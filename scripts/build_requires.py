"""Print pyproject.toml's [build-system] requires, torch left out, one per line.

`pip install --no-build-isolation` (the Makefile's install: the C++ extension must build against the
torch already installed) installs no build tools itself; the Makefile installs these first, so that
pyproject.toml stays the one list of them.
"""
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the Makefile installs tomli on Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def main() -> None:
    requires = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["build-system"]["requires"]
    for requirement in requires:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        if name.lower() != "torch":  # installed first, from the Makefile's TORCH_SPEC
            print(requirement)


if __name__ == "__main__":
    main()
