"""Prints what the named installed packages require, one requirement a line, for `pip install -r`
(make compat): torch and torchvision are installed with --no-deps from local wheels, then their own
requirements from this list, so that every package comes from the machine's local wheel folders
(pip --no-index) and none is downloaded.

Left out: the packages named (torchvision requires torch), and cuda-bindings, the Python bindings of
the CUDA driver API, which is not on this machine's disk and which torch on the CPU never imports
(torch.cuda imports it lazily, for GPU work only).

    python tests/compat/torch_requirements.py torch torchvision > requirements.txt
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LEFT_OUT = {"cuda-bindings"}


def requirements(packages):
    named = {canonicalize_name(p) for p in packages}
    found = []
    for package in packages:
        for line in requires(package) or []:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) in named | LEFT_OUT:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # another platform, or one of the package's optional extras
            requirement.marker = None
            if str(requirement) not in found:
                found.append(str(requirement))
    return found


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:] or ["torch"])))
