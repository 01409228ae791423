// The norm ops and clip_ on CUDA.
//
// A tensor's partial (sum of squares, or max |x|, in float64) is a fixed
// two-stage reduction: every chunk (block) writes one float64 partial at its
// own slot of a scratch buffer, then one block per tensor combines that
// tensor's chunk partials in a fixed shape. The norm is a third fixed-shape
// reduction, by one block, over the partials in slot order. No atomics, and a
// tensor's partial depends on the tensor alone (not on the other tensors of
// the call, the dtype buckets or the tables), so partials written one param
// at a time during backward equal those of one call over every grad.
#include <cmath>
#include <limits>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"
#include "cuda/reduce.cuh"

namespace fused_wd {
namespace cuda {
namespace {

constexpr int kFinalThreads = 1024;

__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }

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

// Stage 2: block s combines the chunk partials of table slot s (thread j:
// chunks j, j + kThreads, ... in order, then the block tree) and writes the
// tensor's partial at out[tab.id[s]].
template <bool INF>
__global__ void __launch_bounds__(kThreads)
    tensor_partials_kernel(ChunkTable<1> tab, const double* __restrict__ chunk_partials,
                           double* __restrict__ out) {
  __shared__ double sh[kThreads];
  const int s = static_cast<int>(blockIdx.x);
  const int64_t nc = (tab.numel[s] + kChunk - 1) / kChunk;
  const double* part = chunk_partials + tab.chunk_start[s];
  const double r = reduce_chunks<INF, kThreads>(part, nc, sh);
  if (threadIdx.x == 0) out[tab.id[s]] = r;
}

// The norm: one block reduces the n partials in a fixed order.
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

// Packs dense (grouped by dtype) into tables and calls per_table(dtype,
// table, nchunks) for each; entry k carries id ids[k] when ids is given.
template <typename PerTable>
void for_each_bucket_table(at::TensorList dense, const std::vector<int64_t>* ids,
                           PerTable&& per_table) {
  for (const auto& idx : group_by_dtype(dense)) {
    const at::ScalarType st = dense[idx[0]].scalar_type();
    for_each_table<1>(
        static_cast<int64_t>(idx.size()),
        [&](int64_t k) {
          prefetch_with_storage(dense, static_cast<size_t>(idx[k]));
          const at::Tensor& t = dense[idx[k]];
          Entry<1> e;
          e.numel = t.numel();
          e.ptr[0] = e.numel ? data_of(t) : nullptr;
          if (ids) e.id = static_cast<uint32_t>((*ids)[idx[k]]);
          return e;
        },
        [&](const ChunkTable<1>& tab, int nchunks) { per_table(st, tab, nchunks); });
  }
}

// Writes the partial of every tensor of `in` at its slot of `out` (and 0 at
// the slots of None or empty entries), on `stream`.
void write_partials(const NormInputs& in, bool inf, at::Tensor& out, Stream stream) {
  TORCH_CHECK(out.numel() <= static_cast<int64_t>(UINT32_MAX), "fused_wd: more than 2^32 norm slots");
  const at::TensorList present = in.present.tensors();
  if (!in.zero.empty()) {
    if (in.zero.size() + present.size() == static_cast<size_t>(out.numel()))
      out.zero_();
    else
      for (int64_t s : in.zero) out.narrow(0, s, 1).zero_();
  }
  if (present.empty()) return;
  int64_t total_chunks = 0;
  for (const auto& t : present) total_chunks += (t.numel() + kChunk - 1) / kChunk;
  at::Tensor chunk = scratch(total_chunks, out.options());
  double* base = chunk.data_ptr<double>();
  double* dst = out.data_ptr<double>();
  int64_t offset = 0;
  for_each_bucket_table(present, &in.slot, [&](at::ScalarType st, const ChunkTable<1>& tab, int nchunks) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fused_wd_norm", [&] {
      launch(inf ? norm_partials_kernel<scalar_t, true> : norm_partials_kernel<scalar_t, false>,
             nchunks, kThreads, stream, tab, base + offset);
    });
    launch(inf ? tensor_partials_kernel<true> : tensor_partials_kernel<false>, tab.ntensors,
           kThreads, stream, tab, static_cast<const double*>(base + offset), dst);
    offset += nchunks;
  });
  TORCH_INTERNAL_ASSERT(offset == total_chunks);
}

// The norm of `partials` as a float32 0-dim tensor.
at::Tensor reduce_partials(const at::Tensor& partials, bool inf, Stream stream) {
  at::Tensor out = at::empty({}, partials.options().dtype(at::kFloat));
  launch(inf ? norm_final_kernel<true> : norm_final_kernel<false>, 1, kFinalThreads, stream,
         static_cast<const double*>(partials.data_ptr<double>()), partials.numel(),
         out.data_ptr<float>());
  return out;
}

}  // namespace

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type) {
  const char* op = "fused_wd::multi_tensor_norm";
  TORCH_CHECK(!tensors.empty(), op, ": got an empty list of tensors");
  const bool inf = norm_kind(op, norm_type);
  const std::vector<ListSpec> specs = {{"tensors", tensors, false, false}};
  check_lists(op, specs, kDeviceType);
  const at::Device device = tensors[0].device();
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> index(tensors.size());
  for (int64_t i = 0; i < n; ++i) index[i] = i;
  const NormInputs in = norm_inputs(op, tensors, index, n, device);
  DeviceGuard guard(device);
  Stream stream = current_stream(device);
  at::Tensor partials = scratch(n, tensors[0].options().dtype(at::kDouble));
  write_partials(in, inf, partials, stream);
  return reduce_partials(partials, inf, stream);
}

void norm_partials_(OptionalTensors tensors, at::Tensor& out, at::IntArrayRef index,
                    double norm_type, bool of_grads) {
  const char* op = "fused_wd::norm_partials_";
  const bool inf = norm_kind(op, norm_type);
  check_partials(op, out, kDeviceType);
  const NormInputs in =
      norm_inputs(op, tensors.tensors, index, out.numel(), out.device(), of_grads);
  DeviceGuard guard(out.device());
  write_partials(in, inf, out, current_stream(out.device()));
}

at::Tensor norm_from_partials(const at::Tensor& partials, double norm_type) {
  const char* op = "fused_wd::norm_from_partials";
  const bool inf = norm_kind(op, norm_type);
  check_partials(op, partials, kDeviceType);
  DeviceGuard guard(partials.device());
  return reduce_partials(partials, inf, current_stream(partials.device()));
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
  for_each_bucket_table(dl.dense[0], nullptr, [&](at::ScalarType st, const ChunkTable<1>& tab, int nchunks) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fused_wd_clip", [&] {
      launch(clip_kernel<scalar_t>, nchunks, kThreads, stream, tab, norm, mn);
    });
  });
  dl.write_back();
}

}  // namespace cuda
}  // namespace fused_wd
