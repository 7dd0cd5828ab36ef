#include "stream_capture.h"

#include <array>
#include <atomic>

namespace torchmha::composite {
namespace {

constexpr auto kDeviceTypes = static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES);

// Zero-initialised before any constructor runs, so a query registered from another file's static
// initialiser is never overwritten.
std::array<std::atomic<StreamCaptureQuery>, kDeviceTypes> queries{};

}  // namespace

void set_stream_capture_query(c10::DeviceType type, StreamCaptureQuery query) {
  queries[static_cast<size_t>(type)].store(query);
}

bool is_stream_capturing(c10::Device device) {
  const auto query = queries[static_cast<size_t>(device.type())].load();
  return query != nullptr && query(device);
}

}  // namespace torchmha::composite
