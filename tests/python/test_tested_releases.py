"""The tested PyTorch releases are stated once per place that warns or documents them, and the
places agree: setup.py (a wheel built against another release warns), CMakeLists.txt (so does a
CMake build) and tests/README.md ("Tested PyTorch releases", with the pass counts)."""

import ast
import re
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]


def releases_in_setup_py() -> List[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "TESTED_TORCH_RELEASES"
            for target in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no TESTED_TORCH_RELEASES")


def releases_in_cmake() -> List[str]:
    match = re.search(
        r"set\(TORCHMHA_TESTED_TORCH_RELEASES ([0-9. ]+)\)", (ROOT / "CMakeLists.txt").read_text()
    )
    assert match, "CMakeLists.txt has no TORCHMHA_TESTED_TORCH_RELEASES"
    return match.group(1).split()


def releases_in_tests_readme() -> List[str]:
    text = (ROOT / "tests" / "README.md").read_text()
    section = text.split("## Tested PyTorch releases", 1)[1].split("\n## ", 1)[0]
    found = set(re.findall(r"^\| (\d+\.\d+)\.\d+", section, flags=re.MULTILINE))
    return sorted(found, key=lambda release: tuple(map(int, release.split("."))))


def test_setup_cmake_and_tests_readme_name_the_same_releases() -> None:
    releases = releases_in_setup_py()
    # Oldest first: setup.py requires at least the first.
    assert releases == sorted(releases, key=lambda release: tuple(map(int, release.split("."))))
    assert releases == releases_in_cmake()
    assert releases == releases_in_tests_readme()
