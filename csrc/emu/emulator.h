// Host execution of the CUDA kernels (csrc/cuda), for machines without a GPU.
//
// A launch runs its blocks one at a time, in a shuffled order (a hidden
// dependency between blocks of one launch then shows up as a wrong result
// in some order). Each block runs with its real shape: one OS thread per
// CUDA thread, all of them live at once, and __syncthreads() is a real
// barrier between the block's threads. A thread that returns from the
// kernel leaves the barrier, as an exited thread does on the GPU.
// __shared__ variables are function statics (see csrc/cuda/compat.h): one
// copy per kernel instantiation, which is exactly a block's own shared
// memory because no two blocks ever run at the same time. Launches are
// serialized.
//
// The worker threads are kept between launches (a pool that grows to the
// largest block seen). A barrier that no thread leaves for five minutes
// (a __syncthreads that some threads never reach) aborts with a message.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace fused_wd {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fused_wd CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier whose party count shrinks as threads leave.
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(m_);
    parties_ = parties;
    arrived_ = 0;
  }

  // Waits for every remaining party; `last` runs in the last one to arrive,
  // before anyone is released.
  template <typename F>
  void arrive_and_wait(F&& last) {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++arrived_ == parties_) {
      last();
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::minutes(5), [&] { return gen_ != gen; }))
      fail("a barrier waited 5 minutes: some threads of a block never reach __syncthreads()");
  }

  void arrive_and_wait() {
    arrive_and_wait([] {});
  }

  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(m_);
    --parties_;
    if (arrived_ > 0 && arrived_ == parties_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }

  std::mutex m_;
  std::condition_variable cv_;
  int parties_ = 0;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

// Threads that run the jobs of one launch, job(thread index), and wait.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      ++gen_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int nthreads, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> lock(m_);
    while (static_cast<int>(workers_.size()) < nthreads) {
      const int i = static_cast<int>(workers_.size());
      workers_.emplace_back([this, i] { work(i); });
    }
    job_ = &job;
    active_ = nthreads;
    done_ = 0;
    ++gen_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return done_ == active_; });
    job_ = nullptr;
  }

 private:
  void work(int i) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      cv_.wait(lock, [&] { return gen_ != seen; });
      seen = gen_;
      if (stop_) return;
      if (i >= active_) continue;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      (*job)(i);
      lock.lock();
      if (++done_ == active_) done_cv_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, done_ = 0;
  uint64_t gen_ = 0;
  bool stop_ = false;
};

struct State {
  std::mutex launch;
  Pool pool;
  Barrier sync;  // __syncthreads of the running block
  Barrier end;   // every thread of the running block has returned
  uint64_t launches = 0;
};

inline State& state() {
  static State* s = new State();  // never destroyed: workers may outlive exit handlers
  return *s;
}

inline thread_local bool in_kernel = false;

inline void syncthreads() {
  if (!in_kernel) fail("__syncthreads() outside a kernel");
  state().sync.arrive_and_wait();
}

// The order of the blocks of launch number `launch`: shuffled, reproducibly
// (FUSED_WD_EMU_SEED changes the sequence).
inline std::vector<unsigned> block_order(unsigned nblocks, uint64_t launch) {
  std::vector<unsigned> order(nblocks);
  std::iota(order.begin(), order.end(), 0u);
  const char* env = std::getenv("FUSED_WD_EMU_SEED");
  std::mt19937_64 rng((env ? std::strtoull(env, nullptr, 10) : 0) * 1000003u + launch);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// FUSED_WD_EMU_HOST_ONLY=1 (read once): launches are checked and counted
// but their blocks do not run, so that a timing of an op is the CUDA host
// code's alone (benchmarks/cuda_host_cost.py). Nothing is computed then;
// the tests never set it.
inline bool host_only() {
  static const bool on = [] {
    const char* env = std::getenv("FUSED_WD_EMU_HOST_ONLY");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}

// Runs body() as kernel<<<grid, block>>>: every thread of every block.
inline void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1)
    fail("only 1-D grids and blocks are emulated");
  if (grid.x == 0 || grid.x > 0x7FFFFFFFu) fail("grid.x out of range [1, 2^31 - 1]");
  if (block.x == 0 || block.x > 1024) fail("block.x out of range [1, 1024]");
  State& st = state();
  std::lock_guard<std::mutex> lock(st.launch);
  if (host_only()) {
    ++st.launches;
    return;
  }
  const std::vector<unsigned> order = block_order(grid.x, st.launches++);
  const int nthreads = static_cast<int>(block.x);
  st.sync.reset(nthreads);
  st.end.reset(nthreads);
  st.pool.run(nthreads, [&](int t) {
    threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
    blockDim = block;
    gridDim = grid;
    for (unsigned b : order) {
      blockIdx = uint3{b, 0, 0};
      in_kernel = true;
      body();
      in_kernel = false;
      st.sync.arrive_and_drop();
      st.end.arrive_and_wait([&] { st.sync.reset(nthreads); });
    }
  });
}

}  // namespace emu
}  // namespace fused_wd
