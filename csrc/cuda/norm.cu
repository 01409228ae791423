// multi_tensor_norm and clip_ on CUDA.
//
// The norm is a deterministic two-stage reduction: every chunk (block) of
// every tensor writes one float64 partial (sum of squares, or max |x|) at its
// own slot of a scratch buffer, slots numbered in a fixed order (dtype
// bucket, tensor, chunk); a single-block kernel then reduces the partials in
// a fixed order and writes the float32 result. No atomics: the same inputs
// give the same bits on every run, whatever the scheduling.
#include <cmath>
#include <limits>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"

namespace fused_wd {
namespace cuda {
namespace {

constexpr int kFinalThreads = 1024;

__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }

template <bool INF>
__device__ __forceinline__ double combine(double a, double b) {
  return INF ? fused_wd::nan_max(a, b) : a + b;
}

// Fixed-shape tree reduction of one value per thread; result in thread 0.
template <bool INF, int NT>
__device__ __forceinline__ double block_reduce(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = combine<INF>(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  return sh[0];
}

// Stage 1: partials[b] = reduction of chunk b of the launch. Each thread
// accumulates its (at most kChunk / kThreads) elements in opmath, in a fixed
// order, then the block combines the threads in float64.
template <typename scalar_t, bool INF>
__global__ void __launch_bounds__(kThreads)
    norm_partials_kernel(ChunkTable<1> tab, double* __restrict__ partials) {
  using T = at::opmath_type<scalar_t>;
  __shared__ double sh[kThreads];
  const ChunkPos pos = locate_chunk(tab);
  scalar_t* const p[1] = {static_cast<scalar_t*>(tab.ptr[0][pos.t]) + pos.begin};
  T acc = T(0);
  for_each_element<scalar_t, 1, 0u>(p, pos.n, [&](T(&x)[1]) {
    if (INF) {
      acc = fused_wd::nan_max(abs_(x[0]), acc);
    } else {
      acc = acc + x[0] * x[0];
    }
  });
  const double r = block_reduce<INF, kThreads>(static_cast<double>(acc), sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

// Stage 2: one block reduces the n partials in a fixed order.
template <bool INF>
__global__ void __launch_bounds__(kFinalThreads)
    norm_final_kernel(const double* __restrict__ partials, int64_t n, float* __restrict__ out) {
  __shared__ double sh[kFinalThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) acc = combine<INF>(partials[i], acc);
  const double r = block_reduce<INF, kFinalThreads>(acc, sh);
  if (threadIdx.x == 0) *out = INF ? static_cast<float>(r) : static_cast<float>(sqrt(r));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) clip_kernel(ChunkTable<1> tab, ScalarRef norm, float max_norm) {
  using T = at::opmath_type<scalar_t>;
  const float c = fused_wd::clip_coef(static_cast<float>(load_scalar(norm)), max_norm);
  // x * 1 == x exactly (also after the storage round trip): nothing to write.
  if (c == 1.0f) return;
  const T coef = static_cast<T>(c);
  const ChunkPos pos = locate_chunk(tab);
  scalar_t* const p[1] = {static_cast<scalar_t*>(tab.ptr[0][pos.t]) + pos.begin};
  for_each_element<scalar_t, 1, 1u>(p, pos.n, [&](T(&x)[1]) { x[0] = x[0] * coef; });
}

template <typename PerTable>
void for_each_bucket_table(const std::vector<at::Tensor>& dense,
                           const std::vector<std::vector<int64_t>>& groups, PerTable&& per_table) {
  for (const auto& idx : groups) {
    const at::ScalarType st = dense[idx[0]].scalar_type();
    for_each_table<1>(
        static_cast<int64_t>(idx.size()),
        [&](int64_t k) {
          const at::Tensor& t = dense[idx[k]];
          Entry<1> e;
          e.numel = t.numel();
          e.ptr[0] = e.numel ? t.data_ptr() : nullptr;
          return e;
        },
        [&](const ChunkTable<1>& tab, int nchunks) { per_table(st, tab, nchunks); });
  }
}

}  // namespace

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type) {
  const char* op = "fused_wd::multi_tensor_norm";
  TORCH_CHECK(!tensors.empty(), op, ": got an empty list of tensors");
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  TORCH_CHECK(inf || norm_type == 2.0, op, ": norm_type must be 2 or inf, got ", norm_type);
  const std::vector<ListSpec> specs = {{"tensors", tensors, false, false}};
  check_lists(op, specs, kDeviceType);
  const at::Device device = tensors[0].device();
  DeviceGuard guard(device);
  Stream stream = current_stream(device);

  DenseLists dl = make_dense(specs);
  const std::vector<at::Tensor>& dense = dl.dense[0];
  const auto groups = group_by_dtype(dense);

  int64_t total_chunks = 0;
  for (const auto& t : dense) total_chunks += (t.numel() + kChunk - 1) / kChunk;
  at::Tensor partials = scratch(std::max<int64_t>(total_chunks, 1), dense[0].options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, dense[0].options().dtype(at::kFloat));

  double* base = partials.data_ptr<double>();
  int64_t offset = 0;
  for_each_bucket_table(dense, groups, [&](at::ScalarType st, const ChunkTable<1>& tab, int nchunks) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fused_wd_norm", [&] {
      launch(inf ? norm_partials_kernel<scalar_t, true> : norm_partials_kernel<scalar_t, false>,
             nchunks, kThreads, stream, tab, base + offset);
    });
    offset += nchunks;
  });
  TORCH_INTERNAL_ASSERT(offset == total_chunks);
  launch(inf ? norm_final_kernel<true> : norm_final_kernel<false>, 1, kFinalThreads, stream, base,
         total_chunks, out.data_ptr<float>());
  return out;
}

void clip_(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  const char* op = "fused_wd::clip_";
  if (tensors.empty()) return;
  const std::vector<ListSpec> specs = {{"tensors", tensors, true, false}};
  check_lists(op, specs, kDeviceType);
  const at::Device device = tensors[0].device();
  check_scalar_tensor(op, "total_norm", total_norm, device, false);
  DeviceGuard guard(device);
  Stream stream = current_stream(device);
  const ScalarRef norm = scalar_ref(op, "total_norm", total_norm);
  const float mn = static_cast<float>(max_norm);

  DenseLists dl = make_dense(specs);
  const auto groups = group_by_dtype(dl.dense[0]);
  for_each_bucket_table(dl.dense[0], groups, [&](at::ScalarType st, const ChunkTable<1>& tab, int nchunks) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fused_wd_clip", [&] {
      launch(clip_kernel<scalar_t>, nchunks, kThreads, stream, tab, norm, mn);
    });
  });
  dl.write_back();
}

}  // namespace cuda
}  // namespace fused_wd
