#pragma once

// Whether a device's current stream is being captured into a graph (a CUDA graph). Work queued
// then is recorded, not run: the op may not copy tensor values to the host, so its checks of
// values go into the graph instead, as in traced steps.
#include <c10/core/Device.h>

namespace torchmha::composite {

using StreamCaptureQuery = bool (*)(c10::Device device);

// Set by the CUDA build (csrc/cuda/stream_capture.cpp) when the library loads: the composite
// code compiles without CUDA and asks through this hook.
void set_stream_capture_query(c10::DeviceType type, StreamCaptureQuery query);

// False where no query is registered for the device's type (the CPU, a build without CUDA).
bool is_stream_capturing(c10::Device device);

}  // namespace torchmha::composite
