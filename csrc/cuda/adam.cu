// adam_ on CUDA: one multi-tensor launch per dtype bucket (and per full
// table), the per-element math of fused_wd/math.h, then (with stats) one
// small launch that reduces the statistics, and one that advances the step
// counters, both unless the step was skipped.
#include <algorithm>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"

namespace fused_wd {
namespace cuda {

// ------------------------------------------------------------ step counters

namespace {

__global__ void increment_steps_kernel(StepTable tab, PrepArgs prep) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= tab.n) return;
  if (read_prep(prep).skip) return;
  if (tab.is_double[i]) {
    *static_cast<double*>(tab.step[i]) += 1.0;
  } else {
    *static_cast<float*>(tab.step[i]) += 1.0f;
  }
}

}  // namespace

std::vector<StepTable> step_tables(const PackLists& pl) {
  std::vector<StepTable> tables;
  for (size_t i = 0; i < pl.steps.size(); ++i) {
    prefetch_with_storage(pl.steps, i);
    if (tables.empty() || tables.back().n == kStepsPerLaunch) {
      tables.emplace_back();
      std::memset(&tables.back(), 0, sizeof(StepTable));
    }
    StepTable& tab = tables.back();
    const at::Tensor& s = pl.steps[i];
    tab.step[tab.n] = data_of(held(pl.op, "state_steps", i, s));
    tab.is_double[tab.n] = s.scalar_type() == at::kDouble;
    ++tab.n;
  }
  return tables;
}

void increment_steps(const std::vector<StepTable>& tables, const PrepArgs& prep, Stream stream) {
  constexpr int kT = 128;
  for (const StepTable& tab : tables)
    launch(increment_steps_kernel, (tab.n + kT - 1) / kT, kT, stream, tab, prep);
}

// ------------------------------------------------------------ statistics

namespace {

__global__ void __launch_bounds__(kThreads) stats_reduce_kernel(StatsReduce r, PrepArgs prep) {
  __shared__ double sh_p[kThreads];
  __shared__ double sh_v[kThreads];
  if (read_prep(prep).skip) return;  // the update wrote no partial either
  const int b = static_cast<int>(blockIdx.x);
  if (b < r.ntensors) {
    const double* m = r.meta + 3 * static_cast<int64_t>(b);
    const int64_t slot = static_cast<int64_t>(m[0]);
    const int64_t first = static_cast<int64_t>(m[1]);
    const int64_t nc = static_cast<int64_t>(m[2]);
    const double p = reduce_chunks<false, kThreads>(r.part + first, nc, sh_p);
    const double v = reduce_chunks<false, kThreads>(r.part + r.total_chunks + first, nc, sh_v);
    if (threadIdx.x == 0) {
      r.stats[slot] = p;
      r.stats[r.nslots + slot] = v;
    }
    return;
  }
  for (int j = threadIdx.x; j < r.nempty; j += blockDim.x) {
    r.stats[r.empty[j]] = 0.0;
    r.stats[r.nslots + r.empty[j]] = 0.0;
  }
}

}  // namespace

void StatsPlan::finish(const PrepArgs& prep, Stream stream) {
  if (!on_) return;
  StatsReduce r;
  std::memset(&r, 0, sizeof(r));
  r.part = out_.part;
  r.meta = out_.meta;
  r.stats = stats_.data_ptr<double>();
  r.total_chunks = out_.total_chunks;
  r.nslots = stats_.size(1);
  TORCH_INTERNAL_ASSERT(out_.tensor_offset == ntensors_ && out_.chunk_offset == out_.total_chunks);
  TORCH_CHECK(ntensors_ < INT32_MAX, "fused_wd: too many tensors");
  r.ntensors = static_cast<int>(ntensors_);
  // one launch unless more than kEmptyPerLaunch params are empty
  size_t e = 0;
  do {
    r.nempty = static_cast<int>(std::min<size_t>(empty_.size() - e, kEmptyPerLaunch));
    for (int j = 0; j < r.nempty; ++j) r.empty[j] = empty_[e + j];
    e += r.nempty;
    const int64_t grid = r.ntensors + (r.nempty > 0 ? 1 : 0);
    if (grid > 0) launch(stats_reduce_kernel, grid, kThreads, stream, r, prep);
    r.ntensors = 0;
  } while (e < empty_.size());
}

// ---------------------------------------------------------------- Adam

namespace {

struct AdamArgs {
  DeviceStep step;
  double beta1, beta2, eps;
};

// Thread 0 of a block: the skip decision and the Adam scalars of the
// block's tensor at step t = step_after(its counter) (the counter itself is
// advanced by increment_steps afterwards, so every block of a tensor sees
// the same t). Returns t.
template <int DEPTH, typename T>
__device__ double block_adam_scalars(const ChunkTable<DEPTH>& tab, const ChunkPos& pos,
                                     const AdamArgs& a, int* skip, AdamScalars<T>* out) {
  const StepPrep pr = read_prep(a.step.prep);
  *skip = pr.skip ? 1 : 0;
  if (pr.skip) return 0.0;
  const double t = step_after(tab.step[pos.t], tab.step_f64[pos.t] != 0);
  const GradPrep<T> gp = make_grad_prep<T>(pr.inv_scale, pr.coef, a.step.maximize != 0);
  *out = make_adam_scalars<T>(read_lr(a.step), a.beta1, a.beta2, a.eps, read_wd(a.step),
                              a.step.decay_mode, a.step.initial_lr, t, gp);
  return t;
}

template <typename scalar_t, bool AMSGRAD, int DECAY>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(ChunkTable<AMSGRAD ? 5 : 4> tab, AdamArgs a, StatsOut so) {
  constexpr int D = AMSGRAD ? 5 : 4;
  // written: param, exp_avg, exp_avg_sq (and max_exp_avg_sq); grad is read only
  constexpr unsigned kWrite = AMSGRAD ? 0x1Du : 0x0Du;
  using T = at::opmath_type<scalar_t>;
  __shared__ AdamScalars<T> sh_scalars;
  __shared__ int sh_skip;
  __shared__ double sh_p[kThreads];
  __shared__ double sh_v[kThreads];
  const ChunkPos pos = locate_chunk(tab);
  if (threadIdx.x == 0) block_adam_scalars(tab, pos, a, &sh_skip, &sh_scalars);
  __syncthreads();
  if (sh_skip) return;
  const AdamScalars<T> s = sh_scalars;
  scalar_t* p[D];
#pragma unroll
  for (int d = 0; d < D; ++d) p[d] = static_cast<scalar_t*>(tab.ptr[d][pos.t]) + pos.begin;
  T psq = T(0), vsum = T(0);  // this thread's statistics
  for_each_element<scalar_t, D, kWrite>(p, pos.n, [&](T(&x)[D]) {
    if constexpr (AMSGRAD) {
      adam_element<T, true, DECAY>(x[0], x[1], x[2], x[3], x[D - 1], s);
    } else {
      T unused = T(0);
      adam_element<T, false, DECAY>(x[0], x[1], x[2], x[3], unused, s);
    }
    psq = psq + x[0] * x[0];
    vsum = vsum + x[3];
  });
  write_chunk_stats(so, tab, pos, psq, vsum, sh_p, sh_v);
}

// Packs the group idx and queues its launches (run once every group is packed).
template <typename scalar_t, bool AMSGRAD, int DECAY>
void queue_adam(const PackLists& pl, const std::vector<int64_t>& idx, const AdamArgs& args,
                StatsPlan& stats, Stream stream, Launches& queued) {
  constexpr int D = AMSGRAD ? 5 : 4;
  queue_tables<D>(
      queued, static_cast<int64_t>(idx.size()),
      [&](int64_t k) {
        Entry<D> e = entry_of<D>(pl, idx[k]);
        set_step(e, pl, idx[k]);
        e.slot = stats.slot(idx[k]);
        return e;
      },
      [&args, &stats, stream](const ChunkTable<D>& tab, int nchunks) {
        launch(adam_kernel<scalar_t, AMSGRAD, DECAY>, nchunks, kThreads, stream, tab, args,
               stats.next(tab, nchunks));
      });
}

// ---------------------------------------------------- Adam, mixed precision

struct MixedArgs {
  uint64_t sr_seed;
  int master;  // pointer 5 is the fp32 master
  int sr;      // stochastic rounding of bf16 params (no master)
};

// Table pointers: 0 param (PT), 1 grad (PT), 2 exp_avg, 3 exp_avg_sq,
// 4 max_exp_avg_sq (ST; amsgrad), 5 master (float; when mx.master).
template <typename PT, typename ST, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adam_mixed_kernel(ChunkTable<6> tab, AdamArgs a, MixedArgs mx, StatsOut so) {
  __shared__ BlockSetup<AdamScalars<float>> sh;
  __shared__ double sh_p[kThreads];
  __shared__ double sh_v[kThreads];
  const ChunkPos pos = locate_chunk(tab);
  if (threadIdx.x == 0) {
    const double t = block_adam_scalars(tab, pos, a, &sh.skip, &sh.scalars);
    sh.key = mx.sr ? sr_key(mx.sr_seed, tab.id[pos.t], static_cast<uint64_t>(t)) : 0;
  }
  __syncthreads();
  if (sh.skip) return;
  const AdamScalars<float> s = sh.scalars;
  const uint64_t key = sh.key;
  const int64_t b = pos.begin;
  PT* P = static_cast<PT*>(tab.ptr[0][pos.t]) + b;
  const PT* G = static_cast<const PT*>(tab.ptr[1][pos.t]) + b;
  ST* const S[3] = {static_cast<ST*>(tab.ptr[2][pos.t]) + b, static_cast<ST*>(tab.ptr[3][pos.t]) + b,
                    AMSGRAD ? static_cast<ST*>(tab.ptr[4][pos.t]) + b : nullptr};
  float* MS = mx.master ? static_cast<float*>(tab.ptr[5][pos.t]) + b : nullptr;
  // this thread's statistics: the float param (the master's new value)
  // before rounding to PT, exp_avg_sq before rounding to ST
  float psq = 0.0f, vsum = 0.0f;
  // the decay kind as a runtime branch (uniform over the launch): one kernel
  // per storage pair and amsgrad keeps the instantiations few
  with_decay(a.step.decay, [&](auto d) {
    for_each_mixed<PT, ST, 3>(P, G, MS, S, b, pos.n, mx.sr != 0, key,
                              [&](float& p, float g, float (&x)[3]) {
                                adam_element<float, AMSGRAD, decltype(d)::value>(p, g, x[0], x[1],
                                                                                 x[2], s);
                                psq = psq + p * p;
                                vsum = vsum + x[1];
                              });
  });
  write_chunk_stats(so, tab, pos, psq, vsum, sh_p, sh_v);
}

// list indices into the dense lists: p, g, m, v, vmax (or -1), master (or -1)
template <typename PT, typename ST, bool AMSGRAD>
void queue_adam_mixed(const PackLists& pl, const int (&li)[6], const std::vector<int64_t>& idx,
                      at::IntArrayRef sr_ids, const AdamArgs& args, const MixedArgs& mx,
                      StatsPlan& stats, Stream stream, Launches& queued) {
  queue_tables<6>(
      queued, static_cast<int64_t>(idx.size()),
      [&](int64_t k) {
        const int64_t i = idx[k];
        Entry<6> e = entry_of(pl, i, li);
        set_step(e, pl, i);
        e.id = mx.sr ? static_cast<uint32_t>(sr_ids[i]) : 0u;
        e.slot = stats.slot(i);
        return e;
      },
      [&args, mx, &stats, stream](const ChunkTable<6>& tab, int nchunks) {
        launch(adam_mixed_kernel<PT, ST, AMSGRAD>, nchunks, kThreads, stream, tab, args, mx,
               stats.next(tab, nchunks));
      });
}

}  // namespace

void adam(const AdamCall& c) {
  const char* op = "fused_wd::adam_";
  const StepArgs& a = c.step;
  check_step_args(op, a, c.params.size());
  std::vector<ListSpec> specs = {{"params", c.params, true, false},
                                 {"grads", c.grads, false, false},
                                 {"exp_avgs", c.exp_avgs, true, false, kDtypeState},
                                 {"exp_avg_sqs", c.exp_avg_sqs, true, false, kDtypeState}};
  int li[6] = {0, 1, 2, 3, -1, -1};
  if (c.amsgrad) {
    TORCH_CHECK(c.max_exp_avg_sqs.size() == c.params.size(), op, ": amsgrad needs one "
                "max_exp_avg_sqs tensor per param, got ", c.max_exp_avg_sqs.size(), " for ",
                c.params.size());
    li[4] = static_cast<int>(specs.size());
    specs.push_back({"max_exp_avg_sqs", c.max_exp_avg_sqs, true, false, kDtypeState});
  }
  const bool master = add_master(specs, c.master_params, &li[5]);
  // the storages are checked in the pack (PackLists)
  DenseLists dl = checked_dense(op, specs, c.state_steps, true, kDeviceType);
  if (c.params.empty()) return;
  check_stats(op, a, c.params.size(), c.params[0].device(), true);
  const Launch on(op, c.params, a);
  const Stream stream = on.stream;
  const AdamArgs args{on.step, c.beta1, c.beta2, c.eps};

  StatsPlan stats(a, dl.dense[0]);
  const PackLists pl{op, dl.dense, specs, c.state_steps};
  Launches queued;
  for (const Group& group : plan_groups(op, dl, 2, master, a.stochastic_rounding)) {
    const auto& idx = group.idx;
    const Layout& L = group.layout;
    if (L.master || L.sr || L.state != L.param) {
      const MixedArgs mx{static_cast<uint64_t>(a.sr_seed), master ? 1 : 0, L.sr ? 1 : 0};
      dispatch_mixed(L, [&](auto ptag, auto stag) {
        using PT = typename decltype(ptag)::type;
        using ST = typename decltype(stag)::type;
        if (c.amsgrad)
          queue_adam_mixed<PT, ST, true>(pl, li, idx, a.sr_ids, args, mx, stats, stream, queued);
        else
          queue_adam_mixed<PT, ST, false>(pl, li, idx, a.sr_ids, args, mx, stats, stream, queued);
      });
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dl.dense[0][idx[0]].scalar_type(),
                                    "fused_wd_adam", [&] {
      with_bool(c.amsgrad, [&](auto ams) {
        with_decay(args.step.decay, [&](auto decay) {
          queue_adam<scalar_t, decltype(ams)::value, decltype(decay)::value>(pl, idx, args, stats,
                                                                             stream, queued);
        });
      });
    });
  }
  const std::vector<StepTable> steps = step_tables(pl);
  // every table packed and every storage checked: nothing refused can
  // come after a launch
  for (const auto& run : queued) run();
  stats.finish(args.step.prep, stream);
  increment_steps(steps, args.step.prep, stream);
  dl.write_back();
}

}  // namespace cuda
}  // namespace fused_wd
