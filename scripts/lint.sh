#!/usr/bin/env bash
# Fails on C++ that clang-format would change and Python that ruff flags or would reformat.
# With --fix, formats everything in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t cpp_files < <(git ls-files --cached --others --exclude-standard -- '*.cpp' '*.h' '*.cu')
if [[ ${1:-} == --fix ]]; then
  clang-format -i "${cpp_files[@]}"
  .venv/bin/ruff format -q .
  .venv/bin/ruff check -q --fix .
  exit 0
fi
clang-format --dry-run --Werror "${cpp_files[@]}"
.venv/bin/ruff format --check -q .
.venv/bin/ruff check -q .
echo "lint: clang-format and ruff are clean (${#cpp_files[@]} C++ files)"
