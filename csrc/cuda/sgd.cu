// sgd_ on CUDA: one multi-tensor launch per dtype bucket (and per full
// table), the per-element math of fused_wd/math.h, then (with stats) one
// small launch that reduces the statistics unless the step was skipped.
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"

namespace fused_wd {
namespace cuda {
namespace {

struct SgdArgs {
  DeviceStep step;
  double momentum, dampening;
};

// Thread 0 of a block: the skip decision and the SGD scalars. Returns
// whether the step goes ahead.
template <typename T>
__device__ bool block_sgd_scalars(const SgdArgs& a, int* skip, SgdScalars<T>* out) {
  const StepPrep pr = read_prep(a.step.prep);
  *skip = pr.skip ? 1 : 0;
  if (pr.skip) return false;
  const GradPrep<T> gp = make_grad_prep<T>(pr.inv_scale, pr.coef, a.step.maximize != 0);
  *out = make_sgd_scalars<T>(read_lr(a.step), a.momentum, a.dampening, read_wd(a.step),
                             a.step.decay_mode, a.step.initial_lr, gp);
  return true;
}

template <typename scalar_t, int DECAY, bool MOMENTUM, bool NESTEROV>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(ChunkTable<MOMENTUM ? 3 : 2> tab, SgdArgs a, StatsOut so) {
  constexpr int D = MOMENTUM ? 3 : 2;
  constexpr unsigned kWrite = MOMENTUM ? 0x5u : 0x1u;  // param (and momentum buffer)
  using T = at::opmath_type<scalar_t>;
  __shared__ SgdScalars<T> sh_scalars;
  __shared__ int sh_skip;
  __shared__ double sh_p[kThreads];
  __shared__ double sh_v[kThreads];
  const ChunkPos pos = locate_chunk(tab);
  if (threadIdx.x == 0) block_sgd_scalars(a, &sh_skip, &sh_scalars);
  __syncthreads();
  if (sh_skip) return;
  const SgdScalars<T> s = sh_scalars;
  const bool first = tab.flag[pos.t] != 0;
  scalar_t* p[D];
#pragma unroll
  for (int d = 0; d < D; ++d) p[d] = static_cast<scalar_t*>(tab.ptr[d][pos.t]) + pos.begin;
  T psq = T(0);  // this thread's statistics (SGD has no exp_avg_sq: 0)
  for_each_element<scalar_t, D, kWrite>(p, pos.n, [&](T(&x)[D]) {
    if constexpr (MOMENTUM) {
      sgd_element<T, DECAY, true, NESTEROV>(x[0], x[1], x[D - 1], first, s);
    } else {
      T unused = T(0);
      sgd_element<T, DECAY, false, false>(x[0], x[1], unused, false, s);
    }
    psq = psq + x[0] * x[0];
  });
  write_chunk_stats(so, tab, pos, psq, T(0), sh_p, sh_v);
}

// Packs the group idx and queues its launches (run once every group is packed).
template <typename scalar_t, int DECAY, bool MOMENTUM, bool NESTEROV>
void queue_sgd(const PackLists& pl, const std::vector<int64_t>& idx, const c10::List<bool>& is_new,
               const SgdArgs& args, StatsPlan& stats, Stream stream, Launches& queued) {
  constexpr int D = MOMENTUM ? 3 : 2;
  queue_tables<D>(
      queued, static_cast<int64_t>(idx.size()),
      [&](int64_t k) {
        Entry<D> e = entry_of<D>(pl, idx[k]);
        e.flag = MOMENTUM && is_new.get(static_cast<size_t>(idx[k])) ? 1 : 0;
        e.slot = stats.slot(idx[k]);
        return e;
      },
      [&args, &stats, stream](const ChunkTable<D>& tab, int nchunks) {
        launch(sgd_kernel<scalar_t, DECAY, MOMENTUM, NESTEROV>, nchunks, kThreads, stream, tab, args,
               stats.next(tab, nchunks));
      });
}

// ----------------------------------------------------- SGD, mixed precision

struct SgdMixedArgs {
  uint64_t sr_seed;
  int momentum, nesterov;
  int master;  // pointer 3 is the fp32 master
  int sr;      // stochastic rounding of bf16 params (no master); steps in the table
};

// Table pointers: 0 param (PT), 1 grad (PT), 2 momentum buffer (ST; when
// momentum), 3 master (float; when mx.master).
template <typename PT, typename ST>
__global__ void __launch_bounds__(kThreads)
    sgd_mixed_kernel(ChunkTable<4> tab, SgdArgs a, SgdMixedArgs mx, StatsOut so) {
  __shared__ BlockSetup<SgdScalars<float>> sh;
  __shared__ double sh_p[kThreads];
  __shared__ double sh_v[kThreads];
  const ChunkPos pos = locate_chunk(tab);
  if (threadIdx.x == 0 && block_sgd_scalars(a, &sh.skip, &sh.scalars)) {
    const double t = mx.sr ? step_after(tab.step[pos.t], tab.step_f64[pos.t] != 0) : 0.0;
    sh.key = mx.sr ? sr_key(mx.sr_seed, tab.id[pos.t], static_cast<uint64_t>(t)) : 0;
  }
  __syncthreads();
  if (sh.skip) return;
  const SgdScalars<float> s = sh.scalars;
  const uint64_t key = sh.key;
  const bool first = (tab.flag[pos.t] & 1) != 0;
  const int64_t b = pos.begin;
  PT* P = static_cast<PT*>(tab.ptr[0][pos.t]) + b;
  const PT* G = static_cast<const PT*>(tab.ptr[1][pos.t]) + b;
  ST* const S[1] = {mx.momentum ? static_cast<ST*>(tab.ptr[2][pos.t]) + b : nullptr};
  float* MS = mx.master ? static_cast<float*>(tab.ptr[3][pos.t]) + b : nullptr;
  float psq = 0.0f;  // this thread's statistics: the float param before rounding
  // the modes as runtime branches (uniform over the launch): one kernel per
  // storage pair keeps the instantiations few
  with_sgd_modes(a.step.decay, mx.momentum != 0, mx.nesterov != 0, [&](auto d, auto mom, auto nest) {
    for_each_mixed<PT, ST, 1>(P, G, MS, S, b, pos.n, mx.sr != 0, key,
                              [&](float& p, float g, float (&x)[1]) {
                                sgd_element<float, decltype(d)::value, decltype(mom)::value,
                                            decltype(nest)::value>(p, g, x[0], first, s);
                                psq = psq + p * p;
                              });
  });
  write_chunk_stats(so, tab, pos, psq, 0.0f, sh_p, sh_v);
}

// li: dense list of p, g, buf (or -1), master (or -1)
template <typename PT, typename ST>
void queue_sgd_mixed(const PackLists& pl, const int (&li)[4], const std::vector<int64_t>& idx,
                     const c10::List<bool>& is_new, at::IntArrayRef sr_ids, const SgdArgs& args,
                     const SgdMixedArgs& mx, StatsPlan& stats, Stream stream, Launches& queued) {
  queue_tables<4>(
      queued, static_cast<int64_t>(idx.size()),
      [&](int64_t k) {
        const int64_t i = idx[k];
        Entry<4> e = entry_of(pl, i, li);
        e.flag = mx.momentum && is_new.get(static_cast<size_t>(i)) ? 1 : 0;
        if (mx.sr) {
          set_step(e, pl, i);
          e.id = static_cast<uint32_t>(sr_ids[i]);
        }
        e.slot = stats.slot(i);
        return e;
      },
      [&args, mx, &stats, stream](const ChunkTable<4>& tab, int nchunks) {
        launch(sgd_mixed_kernel<PT, ST>, nchunks, kThreads, stream, tab, args, mx, stats.next(tab, nchunks));
      });
}

}  // namespace

void sgd(const SgdCall& c) {
  const char* op = "fused_wd::sgd_";
  const StepArgs& a = c.step;
  check_step_args(op, a, c.params.size());
  const bool use_momentum = c.momentum != 0.0;
  std::vector<ListSpec> specs = {{"params", c.params, true, false}, {"grads", c.grads, false, false}};
  if (use_momentum) {
    TORCH_CHECK(c.momentum_buffers.size() == c.params.size(), op, ": momentum ", c.momentum,
                " needs one momentum buffer per param, got ", c.momentum_buffers.size(), " for ",
                c.params.size());
    TORCH_CHECK(c.buffer_is_new.size() == c.params.size(), op, ": buffer_is_new has ",
                c.buffer_is_new.size(), " entries but params has ", c.params.size());
    specs.push_back({"momentum_buffers", c.momentum_buffers, true, false, kDtypeState});
  }
  int li[4] = {0, 1, use_momentum ? 2 : -1, -1};
  const bool master = add_master(specs, c.master_params, &li[3]);
  // the storages are checked in the pack (PackLists)
  DenseLists dl = checked_dense(op, specs, c.state_steps, a.stochastic_rounding, kDeviceType);
  if (c.params.empty()) return;
  check_stats(op, a, c.params.size(), c.params[0].device(), true);
  const Launch on(op, c.params, a);
  const Stream stream = on.stream;
  const SgdArgs args{on.step, c.momentum, c.dampening};

  StatsPlan stats(a, dl.dense[0]);
  const PackLists pl{op, dl.dense, specs, a.stochastic_rounding ? c.state_steps : at::TensorList()};
  Launches queued;
  for (const Group& group : plan_groups(op, dl, use_momentum ? 2 : -1, master, a.stochastic_rounding)) {
    const auto& idx = group.idx;
    const Layout& L = group.layout;
    if (L.master || L.sr || L.state != L.param) {
      const SgdMixedArgs mx{static_cast<uint64_t>(a.sr_seed), use_momentum ? 1 : 0,
                            c.nesterov ? 1 : 0, master ? 1 : 0, L.sr ? 1 : 0};
      // without momentum the state storage is never touched: float's kernel
      Layout K = L;
      if (!use_momentum) K.state = Storage::kF32;
      dispatch_mixed(K, [&](auto ptag, auto stag) {
        queue_sgd_mixed<typename decltype(ptag)::type, typename decltype(stag)::type>(
            pl, li, idx, c.buffer_is_new, a.sr_ids, args, mx, stats, stream, queued);
      });
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dl.dense[0][idx[0]].scalar_type(),
                                    "fused_wd_sgd", [&] {
      with_sgd_modes(args.step.decay, use_momentum, c.nesterov, [&](auto decay, auto mom, auto nest) {
        queue_sgd<scalar_t, decltype(decay)::value, decltype(mom)::value, decltype(nest)::value>(
            pl, idx, c.buffer_is_new, args, stats, stream, queued);
      });
    });
  }
  const std::vector<StepTable> steps = step_tables(pl);  // none without stochastic rounding
  // every table packed and every storage checked: nothing refused can
  // come after a launch
  for (const auto& run : queued) run();
  stats.finish(args.step.prep, stream);
  increment_steps(steps, args.step.prep, stream);
  dl.write_back();
}

}  // namespace cuda
}  // namespace fused_wd
