// The CUDA build's answer to "is this device's current stream capturing a CUDA graph?"
// (csrc/composite/stream_capture.h), registered when the library loads.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "../composite/stream_capture.h"

namespace torchmha::cuda {
namespace {

bool current_stream_is_capturing(c10::Device device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(
      cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  // An invalidated capture is still a capture: reading values on the host stays illegal.
  return status != cudaStreamCaptureStatusNone;
}

[[maybe_unused]] const bool registered = [] {
  composite::set_stream_capture_query(c10::DeviceType::CUDA, &current_stream_is_capturing);
  return true;
}();

}  // namespace
}  // namespace torchmha::cuda
