"""The C++ error messages stream no number: every argument of a TORCH_CHECK message in csrc/ is a
string literal, an op or argument name, a ScalarType, a `.str()`, or one of csrc/checks.h's *_str
helpers. (On the one CUDA machine tried, a message with a number streamed by the extension crashed
the process instead of raising; see csrc/checks.h.)"""

import pathlib
import re

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))

NAMES = {"op", "name", "a_name", "b_name", "t"}  # const char* names and a ScalarType
ALLOWED = re.compile(r'^("(?:[^"\\]|\\.)*"\s*)+$'           # string literals
                     r"|^\w+_str\(.*\)$"                   # int_str(...), shape_str(...), ...
                     r"|^.*\.str\(\)$|^.*scalar_type\(\)$"  # Device::str(), a ScalarType
                     r"|^cudaGetErrorString\(\w+\)$", re.S)


def split_arguments(text, start):
    """The top-level comma-separated arguments of the call whose '(' is at text[start]."""
    depth, arguments, current, i, quote = 0, [], [], start, False
    while True:
        c = text[i]
        if quote:
            current.append(c)
            if c == "\\":
                current.append(text[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            current.append(c)
        elif c == "(":
            depth += 1
            if depth > 1:
                current.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                arguments.append("".join(current).strip())
                return arguments
            current.append(c)
        elif c == "," and depth == 1:
            arguments.append("".join(current).strip())
            current = []
        else:
            current.append(c)
        i += 1


def message_arguments(source):
    """(line, argument) for every message argument of every TORCH_CHECK / TORCH_CHECK_VALUE call."""
    text = source.read_text()
    for match in re.finditer(r"\bTORCH_CHECK(?:_VALUE)?\s*\(", text):
        arguments = split_arguments(text, match.end() - 1)
        for argument in arguments[1:]:  # the first is the condition
            yield text.count("\n", 0, match.start()) + 1, " ".join(argument.split())


def test_the_scan_finds_the_checks():
    found = [argument for source in SOURCES for _, argument in message_arguments(source)]
    assert len(found) > 40 and "shape_str(x.sizes())" in found, found


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_no_number_is_streamed_into_a_message(source):
    offending = [f"{source.name}:{line}: {argument}" for line, argument in message_arguments(source)
                 if argument not in NAMES and not ALLOWED.match(argument)]
    assert not offending, "wrap numbers and shapes in int_str/float_str/shape_str:\n" + "\n".join(offending)
