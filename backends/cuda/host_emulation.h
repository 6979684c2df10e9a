// Just enough of CUDA to run our kernels on the CPU, so that the tests can run the very
// source that the GPU runs (tests/test_cuda_kernel.py builds it with g++, C++20).
//
// The model: a launch runs its blocks one after another; each CUDA thread of a block is a
// std::thread; __syncthreads is a barrier of those threads. A `__shared__` variable
// becomes a function-level `static`, which all threads of the running block share (blocks
// never overlap, so one copy serves them all); dynamic shared memory is one buffer reused by
// every block. A warp shuffle is a store to a per-thread exchange slot between two waits on a
// barrier of the warp's 32 threads (every lane of a block takes part, as in the kernels).
// Atomics on shared memory map to std::atomic_ref.
//
// Built into a shared library that Python loads next to PyTorch and others, so nothing of it
// may bind to another library's symbols or they to its: build with -fvisibility=hidden, and
// export only the C entry points (TP_HOST_EXPORT). Its barriers are a mutex and a condition
// variable, not std::barrier: libstdc++'s std::barrier waits through a pool of waiters that is
// a header-defined static (std::__detail::__waiter_pool_base::_S_for(void const*)::__w),
// which g++ exports as a process-wide unique symbol whatever the visibility; the first library
// loaded that defines it would then serve every other one, whatever their libstdc++ headers
// made of its layout.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct dim3_like {
  unsigned int x = 0;
};

//: The C entry points of a host build (the only symbols it exports, with -fvisibility=hidden).
#define TP_HOST_EXPORT extern "C" __attribute__((visibility("default")))

namespace tp_host {

// A reusable barrier of `count` threads (std::barrier's arrive_and_wait, without its waiter
// pool: see above).
class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long long phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return phase_ != phase; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const std::ptrdiff_t count_;
  std::ptrdiff_t arrived_ = 0;
  unsigned long long phase_ = 0;
};

inline thread_local dim3_like thread_index;
inline thread_local dim3_like block_index;
inline dim3_like block_dim;
inline dim3_like grid_dim;
inline Barrier* block_barrier = nullptr;
inline std::vector<unsigned char> dynamic_shared;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;  // one per warp
inline std::vector<unsigned long long> exchange;  // a shuffle's slot per thread
constexpr unsigned int kWarpSize = 32;
constexpr std::size_t kSharedGuardBytes = 1 << 16;  // after a launch's dynamic shared memory
constexpr unsigned char kSharedFill = 0xA5;

inline void expect_no_pending_copies();  // below, with the copies

// Runs `kernel()` as `grid` blocks of `threads` threads with `shared_bytes` of dynamic
// shared memory. One launch at a time: the state above belongs to it.
template <typename Kernel>
void launch(unsigned int grid, unsigned int threads, std::size_t shared_bytes, Kernel kernel) {
  static std::mutex one_launch;
  std::lock_guard<std::mutex> lock(one_launch);
  // Garbage-filled, as on a GPU: a kernel that reads shared memory before writing it should
  // not pass the tests by luck. A guard follows, checked after the launch: a kernel that
  // writes past its layout stops the process here rather than corrupt the heap unseen.
  dynamic_shared.assign(shared_bytes + kSharedGuardBytes, kSharedFill);
  block_dim.x = threads;
  grid_dim.x = grid;
  Barrier barrier(static_cast<std::ptrdiff_t>(threads));
  block_barrier = &barrier;
  warp_barriers.clear();
  for (unsigned int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
    warp_barriers.push_back(std::make_unique<Barrier>(kWarpSize));
  }
  exchange.assign(threads, 0);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    pool.emplace_back([t, grid, kernel, &barrier] {
      thread_index.x = t;
      for (unsigned int b = 0; b < grid; ++b) {
        block_index.x = b;
        kernel();
        expect_no_pending_copies();
        barrier.arrive_and_wait();  // the next block may reuse the shared memory
      }
    });
  }
  for (auto& thread : pool) thread.join();
  for (std::size_t e = shared_bytes; e < dynamic_shared.size(); ++e) {
    if (dynamic_shared[e] != kSharedFill) {
      std::fputs("host emulation: a kernel wrote past its dynamic shared memory\n", stderr);
      std::abort();
    }
  }
  block_barrier = nullptr;
}

}  // namespace tp_host

// cp.async, as the kernels use it (device_helpers.cuh, copy_async): each thread's copies
// wait in commit groups and land only at the wait_group that covers them, so a kernel that
// reads a copy before waiting reads the garbage fill, as it might on a GPU.
#define TP_HOST_EMULATION 1
namespace tp_host {

struct PendingCopy {
  void* target;
  const void* source;
  std::size_t bytes;
};
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::vector<std::vector<PendingCopy>> committed_groups;

inline void copy_async(void* target, const void* source, std::size_t bytes) {
  open_group.push_back({target, source, bytes});
}

inline void commit_copies() {
  committed_groups.push_back(std::move(open_group));
  open_group.clear();
}

inline void wait_copies(int pending) {
  while (committed_groups.size() > static_cast<std::size_t>(pending)) {
    for (const PendingCopy& copy : committed_groups.front()) {
      std::memcpy(copy.target, copy.source, copy.bytes);
    }
    committed_groups.erase(committed_groups.begin());
  }
}

// A block that ends with copies it never waited for has a bug the GPU may not show.
inline void expect_no_pending_copies() {
  if (!open_group.empty() || !committed_groups.empty()) {
    std::fputs("host emulation: a thread ended with copies it never waited for\n", stderr);
    std::abort();
  }
}

}  // namespace tp_host

#define threadIdx (tp_host::thread_index)
#define blockIdx (tp_host::block_index)
#define blockDim (tp_host::block_dim)
#define gridDim (tp_host::grid_dim)
#define TP_DYNAMIC_SHARED(name) unsigned char* name = tp_host::dynamic_shared.data()

inline void __syncthreads() { tp_host::block_barrier->arrive_and_wait(); }

// `value` of lane (this lane XOR lane_mask); every lane of the warp calls it.
template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(unsigned long long));
  const unsigned int t = tp_host::thread_index.x;
  tp_host::Barrier& warp = *tp_host::warp_barriers[t / tp_host::kWarpSize];
  std::memcpy(&tp_host::exchange[t], &value, sizeof(T));
  warp.arrive_and_wait();  // every lane has stored
  T other;
  std::memcpy(&other, &tp_host::exchange[t ^ static_cast<unsigned int>(lane_mask)], sizeof(T));
  warp.arrive_and_wait();  // every lane has read: the slots may be reused
  return other;
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> target(*address);
  unsigned long long seen = target.load();
  while (value < seen && !target.compare_exchange_weak(seen, value)) {
  }
  return seen;
}

inline unsigned int __float_as_uint(float value) {
  unsigned int bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline long long __double_as_longlong(double value) {
  long long bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline int atomicOr(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_or(value);
}

inline int atomicAdd(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_add(value);
}

inline unsigned int atomicOr(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_or(value);
}

// 1 + the index of the least significant set bit; 0 for 0.
inline int __ffs(int value) { return __builtin_ffs(value); }

inline int atomicMin(int* address, int value) {
  std::atomic_ref<int> target(*address);
  int seen = target.load();
  while (value < seen && !target.compare_exchange_weak(seen, value)) {
  }
  return seen;
}

inline float __int_as_float(int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline double __longlong_as_double(long long bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
