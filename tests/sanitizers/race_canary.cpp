// Races on purpose: scripts/sanitize.sh checks that ThreadSanitizer reports it, so a clean
// ThreadSanitizer run means races were looked for.
#include <thread>

int main() {
  int counter = 0;
  std::thread other([&counter] { ++counter; });
  ++counter;  // unsynchronised with the other thread's write
  other.join();
  return counter > 0 ? 0 : 1;
}
