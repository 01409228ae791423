// Multi-tensor apply for the fused_wd CUDA kernels.
//
// One launch covers many tensors of one dtype. The host packs, for up to
// ChunkTable<DEPTH>::kMax tensors, the DEPTH data pointers of each entry
// (param, grad, state...), its element count, the index of its first chunk in
// the launch and per-tensor extras (a step counter pointer, a flag) into a
// struct passed by value as the kernel argument (it lives in the constant
// bank, no host->device copy; up to 32 KB of arguments since CUDA 12.1, so
// about 500 tensors of an Adam step per launch). Every tensor is cut into
// chunks of kChunk elements; block b of the grid handles global chunk b of
// the launch and finds its tensor by a binary search over the chunk starts,
// so a launch is bounded only by the number of tensors that fit in the table
// (not by a block count), and a tensor is never split across launches.
//
// Inside a chunk, when every pointer of the entry is 16-byte aligned, the
// body is walked with 16-byte vector loads/stores and only the tail (a
// partial last chunk) element by element; otherwise the whole chunk goes
// element by element (coalesced). Offsets are 64-bit, so tensors past 2^31
// elements work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "fused_wd/math.h"

namespace fused_wd {
namespace cuda {

constexpr int kChunk = 16384;   // elements per chunk (one block)
constexpr int kThreads = 256;   // threads per block of the apply kernels
// room for the table; the op's own arguments get the last 512 bytes
constexpr int kTableBytes = kMaxArgBytes - 512;

template <int DEPTH>
struct ChunkTable {
  static constexpr int kPerTensor = 8 * DEPTH + 8 + 8 + 4 + 4 + 4 + 1 + 1;
  static constexpr int kMax = (kTableBytes - 16) / kPerTensor;
  void* ptr[DEPTH][kMax];
  int64_t numel[kMax];
  void* step[kMax];     // the tensor's step counter (Adam; SGD with stochastic rounding)
  int chunk_start[kMax];
  uint32_t id[kMax];    // stochastic rounding: the param's id in its key
  int32_t slot[kMax];   // statistics: the param's slot in stats
  int ntensors;
  uint8_t flag[kMax];   // SGD: the momentum buffer is new
  uint8_t step_f64[kMax];  // the step counter is float64 (else float32)
};

static_assert(sizeof(ChunkTable<1>) <= kTableBytes, "table too large");
static_assert(sizeof(ChunkTable<5>) <= kTableBytes, "table too large");
static_assert(sizeof(ChunkTable<6>) <= kTableBytes, "table too large");

// One entry as the host hands it to pack_tables.
template <int DEPTH>
struct Entry {
  void* ptr[DEPTH];
  int64_t numel;
  void* step = nullptr;
  uint8_t flag = 0;
  uint8_t step_f64 = 0;
  uint32_t id = 0;
  int32_t slot = 0;
};

// What an update call packs: its dense lists (checked_dense), their names
// (the call's ListSpecs, in the same order) and its step counters. The
// checks pass leaves the storages to the pack: each tensor is checked to
// hold its data (`held`) where the pack reads its data pointer, and every
// table of the call is packed before its first launch, so a refused tensor
// writes nothing. The storages are then read once a step, as in the CPU
// gather.
struct PackLists {
  const char* op;
  const std::vector<at::TensorList>& dense;
  const std::vector<ListSpec>& specs;
  at::TensorList steps;
};

// The entry of tensor i of the dense lists: the params' (dense[0]) element
// count and, for each d, the pointer of list li[d] (-1: none, a null
// pointer). Asks for the metadata and storages of the entries further on
// first, as the CPU gather does (prefetch_with_storage): a pack over
// thousands of tensors otherwise waits on each storage in turn.
template <int DEPTH>
Entry<DEPTH> entry_of(const PackLists& pl, int64_t i, const int (&li)[DEPTH]) {
  for (int d = 0; d < DEPTH; ++d)
    if (li[d] >= 0) prefetch_with_storage(pl.dense[li[d]], static_cast<size_t>(i));
  Entry<DEPTH> e;
  e.numel = pl.dense[0][i].numel();
  for (int d = 0; d < DEPTH; ++d)
    e.ptr[d] = (e.numel && li[d] >= 0)
                   ? data_of(held(pl.op, pl.specs[li[d]].name, static_cast<size_t>(i), pl.dense[li[d]][i]))
                   : nullptr;
  return e;
}

// The same with list d at position d.
template <int DEPTH>
Entry<DEPTH> entry_of(const PackLists& pl, int64_t i) {
  int li[DEPTH];
  for (int d = 0; d < DEPTH; ++d) li[d] = d;
  return entry_of<DEPTH>(pl, i, li);
}

// An entry's step counter, steps[i] (float32 or float64, read and advanced
// on the device).
template <int DEPTH>
void set_step(Entry<DEPTH>& e, const PackLists& pl, int64_t i) {
  prefetch_with_storage(pl.steps, static_cast<size_t>(i));
  const at::Tensor& step = pl.steps[i];
  e.step = data_of(held(pl.op, "state_steps", static_cast<size_t>(i), step));
  e.step_f64 = step.scalar_type() == at::kDouble;
}

// A packed table and its chunk count (the launch's grid).
template <int DEPTH>
struct Packed {
  ChunkTable<DEPTH> tab;
  int nchunks;
};

// Packs entries 0..count-1 (from `get(k)`) into tables, each as full as
// its room allows. Empty tensors are left out (they have no chunk).
template <int DEPTH, typename Get>
std::vector<Packed<DEPTH>> pack_tables(int64_t count, Get&& get) {
  using Table = ChunkTable<DEPTH>;
  std::vector<Packed<DEPTH>> out;
  // room for the tables the table size asks for: none is copied as the
  // vector grows (unless the chunk count splits one more)
  out.reserve(static_cast<size_t>(count / Table::kMax + 1));
  Table* tab = nullptr;
  int64_t chunks = 0;
  for (int64_t k = 0; k < count; ++k) {
    const Entry<DEPTH> e = get(k);
    if (e.numel == 0) continue;
    const int64_t nc = (e.numel + kChunk - 1) / kChunk;
    TORCH_CHECK(nc < INT_MAX, "fused_wd: tensor of ", e.numel, " elements is too large");
    if (tab == nullptr || tab->ntensors == Table::kMax || chunks + nc > static_cast<int64_t>(INT_MAX)) {
      if (tab != nullptr) out.back().nchunks = static_cast<int>(chunks);
      out.emplace_back();
      tab = &out.back().tab;
      std::memset(tab, 0, sizeof(Table));
      chunks = 0;
    }
    const int s = tab->ntensors++;
    for (int d = 0; d < DEPTH; ++d) tab->ptr[d][s] = e.ptr[d];
    tab->numel[s] = e.numel;
    tab->step[s] = e.step;
    tab->flag[s] = e.flag;
    tab->step_f64[s] = e.step_f64;
    tab->id[s] = e.id;
    tab->slot[s] = e.slot;
    tab->chunk_start[s] = static_cast<int>(chunks);
    chunks += nc;
  }
  if (tab != nullptr) out.back().nchunks = static_cast<int>(chunks);
  return out;
}

// pack_tables, then `launch(table, nchunks)` for each table.
template <int DEPTH, typename Get, typename Launch>
void for_each_table(int64_t count, Get&& get, Launch&& launch) {
  for (const Packed<DEPTH>& t : pack_tables<DEPTH>(count, get)) launch(t.tab, t.nchunks);
}

// The launches of an update call, queued while its tables are packed and
// run once every table is (PackLists).
using Launches = std::vector<std::function<void()>>;

// for_each_table with the launches put off: packs now, and queues
// `launch(table, nchunks)` for each table (`launch` is kept: it must hold
// what it uses by value or by reference to what outlives `queued`).
template <int DEPTH, typename Get, typename Launch>
void queue_tables(Launches& queued, int64_t count, Get&& get, Launch launch) {
  queued.push_back([tables = pack_tables<DEPTH>(count, get), launch] {
    for (const Packed<DEPTH>& t : tables) launch(t.tab, t.nchunks);
  });
}

// Where block blockIdx.x works: tensor slot, first element, element count.
struct ChunkPos {
  int t;
  int64_t begin;
  int n;
};

template <int DEPTH>
__device__ __forceinline__ ChunkPos locate_chunk(const ChunkTable<DEPTH>& tab) {
  const int chunk = static_cast<int>(blockIdx.x);
  int lo = 0, hi = tab.ntensors - 1;
  while (lo < hi) {  // last slot whose first chunk is <= chunk
    const int mid = (lo + hi + 1) >> 1;
    if (tab.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  ChunkPos pos;
  pos.t = lo;
  pos.begin = static_cast<int64_t>(chunk - tab.chunk_start[lo]) * kChunk;
  const int64_t left = tab.numel[lo] - pos.begin;
  pos.n = left < kChunk ? static_cast<int>(left) : kChunk;
  return pos;
}

// What thread 0 of a mixed-precision block works out for the others (in
// shared memory): the tensor's scalars, the stochastic-rounding key, and
// whether the step is skipped.
template <typename Scalars>
struct BlockSetup {
  Scalars scalars;
  uint64_t key;
  int skip;
};

template <typename S, int N>
struct alignas(16) Pack {
  S v[N];
};

// Runs f(x) for every element of a chunk, x[d] being element i of list d
// converted to opmath; lists whose bit is set in WMASK are stored back
// (rounded to the storage type). p[d] already points at the chunk start.
template <typename scalar_t, int DEPTH, unsigned WMASK, typename F>
__device__ __forceinline__ void for_each_element(scalar_t* const (&p)[DEPTH], int n, F&& f) {
  using T = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kVec>;
  bool aligned = true;
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) aligned = aligned && (reinterpret_cast<uintptr_t>(p[d]) % 16 == 0);
  int tail = 0;
  if (aligned) {
    const int nvec = n / kVec;
    for (int iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
      P pk[DEPTH];
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) pk[d] = reinterpret_cast<const P*>(p[d])[iv];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        T x[DEPTH];
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) x[d] = static_cast<T>(pk[d].v[e]);
        f(x);
#pragma unroll
        for (int d = 0; d < DEPTH; ++d)
          if ((WMASK >> d) & 1u) pk[d].v[e] = static_cast<scalar_t>(x[d]);
      }
#pragma unroll
      for (int d = 0; d < DEPTH; ++d)
        if ((WMASK >> d) & 1u) reinterpret_cast<P*>(p[d])[iv] = pk[d];
    }
    tail = nvec * kVec;
  }
  for (int i = tail + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
    T x[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) x[d] = static_cast<T>(p[d][i]);
    f(x);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
      if ((WMASK >> d) & 1u) p[d][i] = static_cast<scalar_t>(x[d]);
  }
}

// ------------------------------------------------- mixed precision

// Storage types of the mixed-precision kernels (param / state), as tags.
template <typename T>
struct Tag {
  using type = T;
};

template <typename T>
struct StorageOf;
template <>
struct StorageOf<float> : std::integral_constant<Storage, Storage::kF32> {};
template <>
struct StorageOf<c10::Half> : std::integral_constant<Storage, Storage::kF16> {};
template <>
struct StorageOf<c10::BFloat16> : std::integral_constant<Storage, Storage::kBF16> {};

template <typename PT, typename F>
void dispatch_state(Storage state, F&& f) {
  auto call = [&](auto stag) {
    using ST = typename decltype(stag)::type;
    if constexpr (storages_supported(StorageOf<PT>::value, StorageOf<ST>::value))
      f(Tag<PT>{}, Tag<ST>{});
    else
      TORCH_INTERNAL_ASSERT(false, "fused_wd: a layout outside the rule reached the kernels");
  };
  switch (state) {
    case Storage::kF32: return call(Tag<float>{});
    case Storage::kF16: return call(Tag<c10::Half>{});
    case Storage::kBF16: return call(Tag<c10::BFloat16>{});
    default: TORCH_INTERNAL_ASSERT(false, "fused_wd: float64 has no mixed-precision kernel");
  }
}

// Calls f(Tag<PT>{}, Tag<ST>{}) with the storage types of the mixed-precision
// layout L (checked by layout_for): only the storage pairs of the one rule
// (fused_wd/layout.h) are instantiated.
template <typename F>
void dispatch_mixed(const Layout& L, F&& f) {
  switch (L.param) {
    case Storage::kF32: return dispatch_state<float>(L.state, f);
    case Storage::kF16: return dispatch_state<c10::Half>(L.state, f);
    case Storage::kBF16: return dispatch_state<c10::BFloat16>(L.state, f);
    default: TORCH_INTERNAL_ASSERT(false, "fused_wd: float64 has no mixed-precision kernel");
  }
}

// The updated float param in its storage type: stochastically rounded
// (bf16 storage, sr) or rounded to nearest.
template <typename PT>
__device__ __forceinline__ PT to_param(float x, bool sr, uint64_t key, uint64_t index) {
  if constexpr (std::is_same<PT, c10::BFloat16>::value) {
    if (sr)
      return c10::BFloat16(fused_wd::bf16_bits_stochastic(x, fused_wd::sr_bits(key, index)),
                           c10::BFloat16::from_bits());
  }
  return static_cast<PT>(x);
}

// kMixedVec consecutive elements of one list, loaded or stored as one
// vector access (8 bytes for 16-bit storage, 16 for float).
constexpr int kMixedVec = 4;

template <typename S>
struct alignas(kMixedVec * sizeof(S)) MixedPack {
  S v[kMixedVec];
};

template <typename S>
__device__ __forceinline__ bool pack_aligned(const S* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(MixedPack<S>) == 0;  // null: aligned
}

// Runs f(p, g, x) for every element of a mixed-precision chunk: p is the
// param (from the fp32 master MS when given, else from P), g the grad, x[k]
// the element of state list S[k] (lists left null are absent: 0, not
// stored), all as float; then stores the master, the param (to_param: sr
// keyed by base + element) and the states. When every present pointer is
// aligned to its pack, each thread walks kMixedVec consecutive elements per
// iteration with vector loads and stores, the tail element by element;
// otherwise everything element by element (coalesced either way).
template <typename PT, typename ST, int NS, typename F>
__device__ __forceinline__ void for_each_mixed(PT* P, const PT* G, float* MS, ST* const (&S)[NS],
                                               int64_t base, int n, bool sr, uint64_t key, F&& f) {
  bool vec = pack_aligned(P) && pack_aligned(G) && pack_aligned(MS);
#pragma unroll
  for (int k = 0; k < NS; ++k) vec = vec && pack_aligned(S[k]);
  int tail = 0;
  if (vec) {
    const int nv = n / kMixedVec;
    for (int iv = threadIdx.x; iv < nv; iv += blockDim.x) {
      MixedPack<PT> pv;
      MixedPack<float> mv;
      MixedPack<ST> sv[NS];
      const MixedPack<PT> gv = reinterpret_cast<const MixedPack<PT>*>(G)[iv];
      if (MS) mv = reinterpret_cast<const MixedPack<float>*>(MS)[iv];
      else pv = reinterpret_cast<const MixedPack<PT>*>(P)[iv];
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (S[k]) sv[k] = reinterpret_cast<const MixedPack<ST>*>(S[k])[iv];
#pragma unroll
      for (int e = 0; e < kMixedVec; ++e) {
        float p = MS ? mv.v[e] : static_cast<float>(pv.v[e]);
        float x[NS];
#pragma unroll
        for (int k = 0; k < NS; ++k) x[k] = S[k] ? static_cast<float>(sv[k].v[e]) : 0.0f;
        f(p, static_cast<float>(gv.v[e]), x);
        if (MS) mv.v[e] = p;
        pv.v[e] = to_param<PT>(p, sr, key, static_cast<uint64_t>(base + kMixedVec * iv + e));
#pragma unroll
        for (int k = 0; k < NS; ++k) sv[k].v[e] = static_cast<ST>(x[k]);
      }
      reinterpret_cast<MixedPack<PT>*>(P)[iv] = pv;
      if (MS) reinterpret_cast<MixedPack<float>*>(MS)[iv] = mv;
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (S[k]) reinterpret_cast<MixedPack<ST>*>(S[k])[iv] = sv[k];
    }
    tail = nv * kMixedVec;
  }
  for (int i = tail + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
    float p = MS ? MS[i] : static_cast<float>(P[i]);
    float x[NS];
#pragma unroll
    for (int k = 0; k < NS; ++k) x[k] = S[k] ? static_cast<float>(S[k][i]) : 0.0f;
    f(p, static_cast<float>(G[i]), x);
    if (MS) MS[i] = p;
    P[i] = to_param<PT>(p, sr, key, static_cast<uint64_t>(base + i));
#pragma unroll
    for (int k = 0; k < NS; ++k)
      if (S[k]) S[k][i] = static_cast<ST>(x[k]);
  }
}

// ------------------------------------------------- device scalar arguments

// A 1-element tensor read by the kernels (lr, grad_norm, grad_scale,
// found_inf). ptr == nullptr: not given.
enum ScalarKind : int { kSF32 = 0, kSF64, kSF16, kSBF16, kSU8, kSI32, kSI64 };

struct ScalarRef {
  const void* ptr;
  int kind;
};

inline ScalarRef scalar_ref(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  ScalarRef r{nullptr, kSF32};
  if (!t.has_value() || !t->defined()) return r;
  switch (t->scalar_type()) {
    case at::kFloat: r.kind = kSF32; break;
    case at::kDouble: r.kind = kSF64; break;
    case at::kHalf: r.kind = kSF16; break;
    case at::kBFloat16: r.kind = kSBF16; break;
    case at::kBool:
    case at::kByte: r.kind = kSU8; break;
    case at::kInt: r.kind = kSI32; break;
    case at::kLong: r.kind = kSI64; break;
    default:
      TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", t->scalar_type());
  }
  r.ptr = t->data_ptr();
  return r;
}

__device__ __forceinline__ double load_scalar(const ScalarRef& r) {
  switch (r.kind) {
    case kSF32: return static_cast<double>(*static_cast<const float*>(r.ptr));
    case kSF64: return *static_cast<const double*>(r.ptr);
    case kSF16: return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(r.ptr)));
    case kSBF16:
      return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(r.ptr)));
    case kSU8: return static_cast<double>(*static_cast<const uint8_t*>(r.ptr));
    case kSI32: return static_cast<double>(*static_cast<const int32_t*>(r.ptr));
    default: return static_cast<double>(*static_cast<const int64_t*>(r.ptr));
  }
}

// Gradient preprocessing inputs shared by the update kernels.
struct PrepArgs {
  ScalarRef grad_norm, grad_scale, found_inf;
  float max_norm;
  int clip;            // grad_norm given and max_norm > 0
  int skip_nonfinite;
};

// The skip decision and the unscale/clip factors (math.h), read on the device.
__device__ __forceinline__ StepPrep read_prep(const PrepArgs& a) {
  const bool norm = a.grad_norm.ptr != nullptr;
  return step_prep(a.found_inf.ptr != nullptr,
                   a.found_inf.ptr != nullptr ? load_scalar(a.found_inf) : 0.0,
                   a.grad_scale.ptr != nullptr,
                   a.grad_scale.ptr != nullptr ? load_scalar(a.grad_scale) : 1.0, norm,
                   norm ? static_cast<float>(load_scalar(a.grad_norm)) : 0.0f, a.clip != 0,
                   a.max_norm, a.skip_nonfinite != 0);
}

// The step's arguments as the update kernels read them (by value, in the
// kernel argument bank), shared by Adam and SGD.
struct DeviceStep {
  PrepArgs prep;
  ScalarRef lr_tensor;  // ptr null: lr below
  ScalarRef wd_tensor;  // ptr null: weight_decay below
  double lr, weight_decay, initial_lr;
  int decay_mode;  // DecayMode, for decay_factor
  int decay;       // DecayKind, the kernels' dispatch
  int maximize;
};

// Device: the lr of this step.
__device__ __forceinline__ double read_lr(const DeviceStep& s) {
  return s.lr_tensor.ptr != nullptr ? load_scalar(s.lr_tensor) : s.lr;
}

// Device: the decay strength of this step (its value; whether there is
// decay at all is `decay`, from weight_decay).
__device__ __forceinline__ double read_wd(const DeviceStep& s) {
  return s.wd_tensor.ptr != nullptr ? load_scalar(s.wd_tensor) : s.weight_decay;
}

// Host: a hyperparameter given as a tensor (lr_tensor, wd_tensor; `hint`
// names the optimizer option). One on the params' device is read by the
// kernels (its reference is returned); a CPU one is read here into *value
// (no device sync), which a CUDA graph being captured would freeze: refused
// then.
inline ScalarRef hyper_ref(const char* op, const char* name, const char* hint,
                           const at::Device& device, const std::optional<at::Tensor>& t,
                           double* value) {
  check_scalar_tensor(op, name, t, device, true);
  if (t.has_value() && t->defined() && t->device() != device) {
    TORCH_CHECK(!capturing(), op, ": ", name, " is on ", t->device(),
                " while a CUDA graph is being captured; its value would be frozen into the "
                "graph. Put the tensor on ", device, " (e.g. ", hint, "=torch.tensor(", hint,
                ", device=\"", device, "\")) to change it between replays");
    *value = t->item<double>();
    return ScalarRef{nullptr, kSF64};
  }
  return scalar_ref(op, name, t);
}

// Host: the skip/unscale/clip inputs (grad_norm, grad_scale, found_inf on
// `device`), checked and packed for read_prep.
inline PrepArgs prep_args(const char* op, const at::Device& device,
                          const std::optional<at::Tensor>& grad_norm, double max_norm,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
  check_scalar_tensor(op, "grad_norm", grad_norm, device, false);
  check_scalar_tensor(op, "grad_scale", grad_scale, device, false);
  check_scalar_tensor(op, "found_inf", found_inf, device, false);
  PrepArgs p;
  std::memset(&p, 0, sizeof(p));
  p.grad_norm = scalar_ref(op, "grad_norm", grad_norm);
  p.grad_scale = scalar_ref(op, "grad_scale", grad_scale);
  p.found_inf = scalar_ref(op, "found_inf", found_inf);
  p.max_norm = static_cast<float>(max_norm);
  p.clip = p.grad_norm.ptr != nullptr && max_norm > 0.0;
  p.skip_nonfinite = skip_nonfinite ? 1 : 0;
  return p;
}

// Host: checks the 1-element arguments (grad_norm, grad_scale, found_inf on
// `device`; lr_tensor and wd_tensor there or on the CPU) and packs the step.
inline DeviceStep device_step(const char* op, const at::Device& device, const StepArgs& a) {
  DeviceStep s;
  std::memset(&s, 0, sizeof(s));
  s.prep = prep_args(op, device, a.grad_norm, a.max_norm, a.grad_scale, a.found_inf,
                     a.skip_nonfinite);
  s.lr = a.lr;
  s.lr_tensor = hyper_ref(op, "lr_tensor", "lr", device, a.lr_tensor, &s.lr);
  s.weight_decay = a.weight_decay;
  s.wd_tensor = hyper_ref(op, "wd_tensor", "weight_decay", device, a.wd_tensor, &s.weight_decay);
  s.initial_lr = a.initial_lr;
  s.decay_mode = static_cast<int>(a.decay_mode);
  s.decay = decay_kind(s.decay_mode, a.weight_decay, a.cautious_wd);
  s.maximize = a.maximize ? 1 : 0;
  return s;
}

// ------------------------------------------------- launch groups

// Host: where an update call launches (its params' device, made current,
// and that device's current stream) and its step arguments for the kernels.
struct Launch {
  at::Device device;
  DeviceGuard guard;
  Stream stream;
  DeviceStep step;
  Launch(const char* op, at::TensorList params, const StepArgs& a)
      : device(params[0].device()),
        guard(device),
        stream(current_stream(device)),
        step(device_step(op, device, a)) {}
};

// The tensors of one launch group: one (param dtype, state dtype) pair, and
// its layout.
struct Group {
  std::vector<int64_t> idx;
  Layout layout;
};

// The groups of an update call, every layout checked (layout_for) before
// the caller launches anything. `state`: the dense list whose dtype is the
// state's, or -1 (no state list: the layout's state is the master's dtype,
// or the param's).
inline std::vector<Group> plan_groups(const char* op, const DenseLists& dl, int state, bool master,
                                      bool stochastic_rounding) {
  const at::TensorList none;
  std::vector<Group> groups;
  for (auto& idx : group_by_dtypes(dl.dense[0], state >= 0 ? dl.dense[state] : none)) {
    const at::ScalarType pt = dl.dense[0][idx[0]].scalar_type();
    const at::ScalarType st =
        state >= 0 ? dl.dense[state][idx[0]].scalar_type() : (master ? at::kFloat : pt);
    const Layout L = layout_for(op, static_cast<size_t>(idx[0]), pt, st, master, stochastic_rounding);
    groups.push_back(Group{std::move(idx), L});
  }
  return groups;
}

// Adds the fp32 master list to `specs` when there is one, and records its
// index in *slot.
inline bool add_master(std::vector<ListSpec>& specs, at::TensorList masters, int* slot) {
  if (masters.empty()) return false;
  *slot = static_cast<int>(specs.size());
  specs.push_back({"master_params", masters, true, false, kDtypeMaster});
  return true;
}

// ------------------------------------------------------------ statistics

// The pass's statistics (schema: csrc/schema.h) in two fixed stages, as the
// norm's partials: every block of an update launch reduces its threads'
// sums (each thread's own elements summed in the math type, then a fixed
// float64 tree) into one partial per chunk, and the first chunk of each
// tensor records where the tensor's chunks are and its slot; then one
// launch per op call (stats_done) combines each tensor's chunk partials in
// chunk order and writes its slot. No atomics, and a tensor's sums depend
// on its elements (and their alignment) alone.
struct StatsOut {
  double* part;           // null: no statistics; else [2, total_chunks] (p^2 sums, v sums)
  double* meta;           // [ntensors, 3]: slot, first chunk in part, chunk count
  int64_t total_chunks;
  int64_t chunk_offset;   // part's index of the launch's chunk 0
  int64_t tensor_offset;  // meta's index of the launch's table slot 0
};

// Device, every thread of an update block after its elements: psq and vsum
// are the thread's sums of p^2 and of exp_avg_sq (T). Needs two shared
// arrays of kThreads doubles; a no-op (and no barrier) without statistics.
template <int DEPTH, typename T>
__device__ __forceinline__ void write_chunk_stats(const StatsOut& so, const ChunkTable<DEPTH>& tab,
                                                  const ChunkPos& pos, T psq, T vsum,
                                                  double* sh_p, double* sh_v) {
  if (so.part == nullptr) return;
  const double p = block_reduce<false, kThreads>(static_cast<double>(psq), sh_p);
  const double v = block_reduce<false, kThreads>(static_cast<double>(vsum), sh_v);
  if (threadIdx.x != 0) return;
  const int64_t c = so.chunk_offset + static_cast<int64_t>(blockIdx.x);
  so.part[c] = p;
  so.part[so.total_chunks + c] = v;
  if (pos.begin == 0) {
    double* m = so.meta + 3 * (so.tensor_offset + pos.t);
    m[0] = static_cast<double>(tab.slot[pos.t]);
    m[1] = static_cast<double>(so.chunk_offset + tab.chunk_start[pos.t]);
    m[2] = static_cast<double>((tab.numel[pos.t] + kChunk - 1) / kChunk);
  }
}

// Host: the statistics of one update call. Made after the checks
// (check_stats), before the launches; next() gives each launch its
// StatsOut, finish() queues the reduction after the last one.
class StatsPlan {
 public:
  StatsPlan(const StepArgs& a, at::TensorList params) : slots_(a.stat_slots) {
    std::memset(&out_, 0, sizeof(out_));
    if (!a.stats.has_value() || !a.stats->defined()) return;
    on_ = true;
    stats_ = *a.stats;
    TORCH_CHECK(stats_.size(1) <= INT32_MAX, "fused_wd: stats has more than 2^31 - 1 slots");
    int64_t chunks = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t n = params[i].numel();
      if (n == 0) {
        empty_.push_back(static_cast<int32_t>(slots_[i]));
        continue;
      }
      chunks += (n + kChunk - 1) / kChunk;
      ++ntensors_;
    }
    buf_ = scratch(2 * chunks + 3 * ntensors_, stats_.options());
    out_.part = buf_.data_ptr<double>();
    out_.meta = out_.part + 2 * chunks;
    out_.total_chunks = chunks;
  }

  // The slot of params[i] (for its table entry).
  int32_t slot(int64_t i) const { return on_ ? static_cast<int32_t>(slots_[i]) : 0; }

  // The StatsOut of a launch of `tab` (nchunks chunks), then past it.
  template <int DEPTH>
  StatsOut next(const ChunkTable<DEPTH>& tab, int nchunks) {
    const StatsOut s = out_;
    out_.chunk_offset += nchunks;
    out_.tensor_offset += tab.ntensors;
    return s;
  }

  // Queues the reduction into stats on `stream` (nothing without stats),
  // conditioned on the skip decision of `prep`.
  void finish(const PrepArgs& prep, Stream stream);

 private:
  at::IntArrayRef slots_;
  at::Tensor stats_, buf_;
  StatsOut out_;
  std::vector<int32_t> empty_;
  int64_t ntensors_ = 0;
  bool on_ = false;  // stats given (out_.part may be null then: every param empty)
};

// The arguments of the reduction: blocks 0..ntensors-1 reduce the tensors
// of meta; a last block (when nempty > 0) writes 0 at the empty params'
// slots.
constexpr int kEmptyPerLaunch = 256;

struct StatsReduce {
  const double* part;
  const double* meta;
  double* stats;
  int64_t total_chunks, nslots;
  int ntensors, nempty;
  int32_t empty[kEmptyPerLaunch];
};

// ------------------------------------------------------------ step counters

// as many counters as a table's room holds (9 bytes each)
constexpr int kStepsPerLaunch = (kTableBytes - 16) / 9;

struct StepTable {
  void* step[kStepsPerLaunch];
  int n;
  uint8_t is_double[kStepsPerLaunch];
};

// Host: the tables of the step counters pl.steps (float32 or float64, 1
// element, on the current device), each counter checked to hold its data
// as it is read; packed with the update's tables, before any launch.
std::vector<StepTable> step_tables(const PackLists& pl);

// Host: increments the counters of `tables` on `stream`, conditioned on the
// skip decision of `prep`. Called after every update kernel of the op was
// queued on that stream, so no block of an update kernel can see a counter
// already advanced (every block of a tensor reads the same step).
void increment_steps(const std::vector<StepTable>& tables, const PrepArgs& prep, Stream stream);

}  // namespace cuda
}  // namespace fused_wd
