// sgd_ on CUDA: one multi-tensor launch per dtype bucket (and per full
// table), the per-element math of fused_wd/math.h.
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"

namespace fused_wd {
namespace cuda {
namespace {

struct SgdArgs {
  PrepArgs prep;
  ScalarRef lr_tensor;
  double lr, momentum, dampening, weight_decay, initial_lr;
  int decay_mode;
  int maximize;
};

template <typename scalar_t, int DECAY, bool MOMENTUM, bool NESTEROV>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(ChunkTable<MOMENTUM ? 3 : 2> tab, SgdArgs a) {
  constexpr int D = MOMENTUM ? 3 : 2;
  constexpr unsigned kWrite = MOMENTUM ? 0x5u : 0x1u;  // param (and momentum buffer)
  using T = at::opmath_type<scalar_t>;
  __shared__ SgdScalars<T> sh_scalars;
  __shared__ int sh_skip;
  const ChunkPos pos = locate_chunk(tab);
  if (threadIdx.x == 0) {
    const Prep pr = read_prep(a.prep);
    sh_skip = pr.skip ? 1 : 0;
    if (!pr.skip) {
      const double lr = a.lr_tensor.ptr != nullptr ? load_scalar(a.lr_tensor) : a.lr;
      const GradPrep<T> gp = make_grad_prep<T>(pr.inv_scale, pr.coef, a.maximize != 0);
      sh_scalars = make_sgd_scalars<T>(lr, a.momentum, a.dampening, a.weight_decay, a.decay_mode,
                                       a.initial_lr, gp);
    }
  }
  __syncthreads();
  if (sh_skip) return;
  const SgdScalars<T> s = sh_scalars;
  const bool first = tab.flag[pos.t] != 0;
  scalar_t* p[D];
#pragma unroll
  for (int d = 0; d < D; ++d) p[d] = static_cast<scalar_t*>(tab.ptr[d][pos.t]) + pos.begin;
  for_each_element<scalar_t, D, kWrite>(p, pos.n, [&](T(&x)[D]) {
    if constexpr (MOMENTUM) {
      sgd_element<T, DECAY, true, NESTEROV>(x[0], x[1], x[D - 1], first, s);
    } else {
      T unused = T(0);
      sgd_element<T, DECAY, false, false>(x[0], x[1], unused, false, s);
    }
  });
}

static_assert(sizeof(ChunkTable<3>) + sizeof(SgdArgs) <= 4000, "sgd kernel arguments too large");

template <typename scalar_t, int DECAY, bool MOMENTUM, bool NESTEROV>
void launch_sgd(const std::vector<std::vector<at::Tensor>>& dense, const std::vector<int64_t>& idx,
                const c10::List<bool>& is_new, const SgdArgs& args, cudaStream_t stream) {
  constexpr int D = MOMENTUM ? 3 : 2;
  for_each_table<D>(
      static_cast<int64_t>(idx.size()),
      [&](int64_t k) {
        const int64_t i = idx[k];
        Entry<D> e;
        e.numel = dense[0][i].numel();
        for (int d = 0; d < D; ++d) e.ptr[d] = e.numel ? dense[d][i].data_ptr() : nullptr;
        e.flag = MOMENTUM && is_new.get(static_cast<size_t>(i)) ? 1 : 0;
        return e;
      },
      [&](const ChunkTable<D>& tab, int nchunks) {
        sgd_kernel<scalar_t, DECAY, MOMENTUM, NESTEROV><<<nchunks, kThreads, 0, stream>>>(tab, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          const c10::List<bool>& buffer_is_new, double lr,
          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
          bool nesterov, double weight_decay, int64_t decay_mode, double initial_lr, bool maximize,
          const std::optional<at::Tensor>& grad_norm, double max_norm,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          bool skip_nonfinite) {
  const char* op = "fused_wd::sgd_";
  TORCH_CHECK(decay_mode >= 0 && decay_mode <= 2, op, ": decay_mode must be 0, 1 or 2, got ",
              decay_mode);
  const bool use_momentum = momentum != 0.0;
  std::vector<ListSpec> specs = {{"params", params, true, false}, {"grads", grads, false, false}};
  if (use_momentum) {
    TORCH_CHECK(momentum_buffers.size() == params.size(), op, ": momentum ", momentum,
                " needs one momentum buffer per param, got ", momentum_buffers.size(), " for ",
                params.size());
    TORCH_CHECK(buffer_is_new.size() == params.size(), op, ": buffer_is_new has ",
                buffer_is_new.size(), " entries but params has ", params.size());
    specs.push_back({"momentum_buffers", momentum_buffers, true, false});
  }
  check_lists(op, specs, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());

  SgdArgs args;
  std::memset(&args, 0, sizeof(args));
  args.prep = make_prep_args(op, device, grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite);
  args.lr = lr;
  args.lr_tensor = lr_ref(op, device, lr_tensor, &args.lr);
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.initial_lr = initial_lr;
  args.decay_mode = static_cast<int>(decay_mode);
  args.maximize = maximize ? 1 : 0;
  const int kind = decay_kind(static_cast<int>(decay_mode), weight_decay);

  DenseLists dl = make_dense(specs);
  for (const auto& idx : group_by_dtype(dl.dense[0])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dl.dense[0][idx[0]].scalar_type(),
                                    "fused_wd_sgd", [&] {
      auto run = [&](auto decay, auto mom, auto nest) {
        launch_sgd<scalar_t, decltype(decay)::value, decltype(mom)::value, decltype(nest)::value>(
            dl.dense, idx, buffer_is_new, args, stream);
      };
      auto with_momentum = [&](auto decay) {
        if (!use_momentum) {
          run(decay, std::false_type{}, std::false_type{});
        } else if (nesterov) {
          run(decay, std::true_type{}, std::true_type{});
        } else {
          run(decay, std::true_type{}, std::false_type{});
        }
      };
      switch (kind) {
        case kL2: with_momentum(std::integral_constant<int, kL2>{}); break;
        case kScaleParam: with_momentum(std::integral_constant<int, kScaleParam>{}); break;
        default: with_momentum(std::integral_constant<int, kNone>{}); break;
      }
    });
  }
  dl.write_back();
}

}  // namespace cuda
}  // namespace fused_wd
