// The CUDA runtime as the host code of the kernels sees it: the device
// guard, the stream, the launch, scratch memory and graph capture. Under
// nvcc these are the CUDA ones; in the host build (csrc/emu) the launch runs
// the emulator on CPU tensors and the rest is inert. Everything else (table
// packing, dispatch, launch shapes, argument checks) is the same code in
// both builds.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <utility>

#include "cuda/compat.h"

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fused_wd {
namespace cuda {

// CUDA's limit on the bytes of a kernel's arguments (the tables are sized to
// it): 32764 since CUDA 12.1 on every architecture CUDA 12 builds for (Volta
// on), 4096 before. FUSED_WD_MAX_ARG_BYTES sets it: the host build of the
// emulated tests takes 4096, so that a few dozen tensors fill a table and
// their calls span several launches.
#if defined(FUSED_WD_MAX_ARG_BYTES)
constexpr int kMaxArgBytes = FUSED_WD_MAX_ARG_BYTES;
#elif defined(__CUDACC__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__) < 1201
constexpr int kMaxArgBytes = 4096;
#else
constexpr int kMaxArgBytes = 32764;
#endif

#if defined(__CUDACC__)

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream(const at::Device& device) {
  return at::cuda::getCurrentCUDAStream(device.index());
}

// Whether the current stream is being captured into a CUDA graph.
inline bool capturing() {
  return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
}

#else

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
using Stream = int;

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

inline Stream current_stream(const at::Device&) { return 0; }
inline bool capturing() { return false; }

#endif

// kernel<<<grid, block, 0, stream>>>(args...), with the argument size and
// launch shape checked in both builds.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, int block, Stream stream, Args&&... args) {
  static_assert((sizeof(KArgs) + ... + 0) <= kMaxArgBytes, "kernel arguments too large");
  TORCH_CHECK(grid >= 1 && grid <= std::numeric_limits<int32_t>::max() && block >= 1 &&
                  block <= 1024,
              "fused_wd: launch shape out of range: grid ", grid, ", block ", block);
#if defined(__CUDACC__)
  kernel<<<static_cast<unsigned>(grid), block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)stream;
  emu::run(dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(block)),
           [&] { kernel(args...); });
#endif
}

// Scratch memory a kernel fills before anything reads it. The host build
// fills it with NaN, so that a slot a kernel forgets to write shows up.
inline at::Tensor scratch(int64_t n, const at::TensorOptions& options) {
  at::Tensor t = at::empty({n}, options);
#if !defined(__CUDACC__)
  t.fill_(std::numeric_limits<double>::quiet_NaN());
#endif
  return t;
}

}  // namespace cuda
}  // namespace fused_wd
