// Leaks one block from LibTorch's CPU allocator on purpose: scripts/sanitize.sh checks that
// LeakSanitizer reports it, so a clean AddressSanitizer run means leaks were looked for.
#include <c10/core/CPUAllocator.h>

int main() {
  void* block = c10::GetCPUAllocator()->raw_allocate(4096);
  block = nullptr;  // the only pointer to the block is gone
  return block == nullptr ? 0 : 1;
}
