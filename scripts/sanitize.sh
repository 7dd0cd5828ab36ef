#!/usr/bin/env bash
# Builds the C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer (in build-asan/) and the
# concurrency tests (tests/cpp/test_concurrency.cpp: the module and the chapter's adapter) with
# ThreadSanitizer (in build-tsan/), runs them, and fails on any report.
# LibTorch itself is not instrumented; tests/sanitizers/lsan.supp, the only suppression file,
# names only LibTorch internals, each with its reason.
#
# Usage: scripts/sanitize.sh [asan|tsan]   (both when no argument is given)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  scripts/setup.sh
fi
if [[ -d /usr/lib/ccache ]]; then
  export PATH=/usr/lib/ccache:$PATH CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$PWD
fi
torch_prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
suppressions=$PWD/tests/sanitizers

# configure_and_build DIR SANITIZERS TEST_SOURCES_GLOB
configure_and_build() {
  cmake -S . -B "$1" -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" -DTORCHMHA_BUILD_EXAMPLES=OFF \
    -DTORCHMHA_SANITIZE="$2" -DTORCHMHA_TEST_SOURCES="$3" >/dev/null
  cmake --build "$1"
}

run_asan() {
  echo "sanitize: AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)"
  # Set before building too: test discovery runs the instrumented binary.
  export ASAN_OPTIONS="detect_leaks=1:strict_init_order=1:detect_stack_use_after_return=1"
  export LSAN_OPTIONS="suppressions=$suppressions/lsan.supp:print_suppressions=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  configure_and_build build-asan address,undefined '*.cpp'
  (cd build-asan && ctest --output-on-failure -j "$(nproc)")
  # The canary leaks on purpose: unless LeakSanitizer reports it, leaks are not being checked.
  local canary
  canary=$(build-asan/torchmha_leak_canary 2>&1 || true)
  if [[ $canary != *"LeakSanitizer: detected memory leaks"* ]]; then
    echo "sanitize: LeakSanitizer missed the canary's deliberate leak:" >&2
    echo "$canary" >&2
    return 1
  fi
  echo "sanitize: LeakSanitizer is live (it reported the canary's deliberate leak)"
}

run_tsan() {
  echo "sanitize: ThreadSanitizer, concurrency tests (build-tsan/)"
  # No suppression: the tests keep one intra-op thread per worker, so uninstrumented OpenMP
  # never runs and LibTorch's own locking goes through intercepted pthread calls.
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
  configure_and_build build-tsan thread test_concurrency.cpp
  (cd build-tsan && ctest --output-on-failure -R Concurrency)
  local canary
  canary=$(build-tsan/torchmha_race_canary 2>&1 || true)
  if [[ $canary != *"ThreadSanitizer: data race"* ]]; then
    echo "sanitize: ThreadSanitizer missed the canary's deliberate race:" >&2
    echo "$canary" >&2
    return 1
  fi
  echo "sanitize: ThreadSanitizer is live (it reported the canary's deliberate race)"
}

start=$SECONDS
case ${1:-all} in
  asan) run_asan ;;
  tsan) run_tsan ;;
  all)
    run_asan
    run_tsan
    ;;
  *) echo "usage: scripts/sanitize.sh [asan|tsan]" >&2 && exit 2 ;;
esac
echo "sanitize: clean ($((SECONDS - start)) s)"
