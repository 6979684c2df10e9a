// Device helpers shared by the Token Pooling kernels (kmedoids.cu): element types, the
// distance tiles, block reductions and the shared-memory layouts. Written for nvcc/NVRTC
// and for g++ through host_emulation.h, so no header (standard or CUDA) is used here.
#pragma once

// Threads per block (one block per problem). 256 keeps eight warps busy on the N x N loops
// while leaving registers for the distance loop; the Python glue launches with the same.
// A macro for __launch_bounds__: nvcc fails to substitute a constexpr variable there in a
// kernel template with a bool parameter.
#define TP_BLOCK_THREADS 256

// Full unrolling where the GPU needs it (register arrays indexed by the loop variable);
// g++ unrolls on its own or not at all.
// TP_LOOP keeps a loop a loop (its body small enough for the instruction cache), where
// nvcc would unroll a loop of few trips in full.
#if defined(TP_HOST_EMULATION)
#define TP_UNROLL
#define TP_LOOP
#else
#define TP_UNROLL _Pragma("unroll")
#define TP_LOOP _Pragma("unroll 1")
#endif

namespace tokenpool {

constexpr int kBlockThreads = TP_BLOCK_THREADS;

//: Features staged in shared memory at a time. Every distance is summed in registers over
//: all features in feature order, so the chunk does not change its bits.
constexpr int kFeatureChunk = 32;

//: Most tokens per problem: N * N and K * N index in an int (no 64-bit division, which
//: compiles to a call and spills registers).
constexpr int kMaxTokens = 4096;

//: Side of the square tiles of distances one thread computes in fill_matrix: each pair of
//: loaded features feeds kTile * kTile cells, which keeps the loop off the shared-memory
//: bandwidth limit.
constexpr int kTile = 4;

//: The shape of the blocks of cells each thread of fill_matrix sums: TileRows tile rows by
//: one tile column (TileRows * kTile x kTile cells), every tile row's values a feature
//: multiplied by one load of the column's. 1 (4 x 4) on sm_80/86/89; 2 (8 x 4, "pair
//: tiles") on sm_90, whose fill the shared-memory loads limit: a pair shares its column
//: load, 3 loads for 32 cells a feature instead of 4 for 32 (the A100's fill is limited by
//: arithmetic, which pairs raise by 20%: benchmarks/README.md, CUDA). The glue picks it by
//: the device's architecture (backends/_cupy.py, tile_rows).
__host__ __device__ constexpr bool valid_tile_rows(int tile_rows) {
  return tile_rows == 1 || tile_rows == 2;
}

//: Blocks each thread sums in registers per round of fill_matrix: where the matrix is in
//: shared memory (one block an SM: up to 255 registers) 7 4 x 4 tiles or 4 pairs (112 or
//: 128 accumulators; one round up to N = 236 or 252); in the global variant, which runs 2
//: blocks an SM (128 registers), 4 tiles or 2 pairs.
__host__ __device__ constexpr int round_blocks(bool shared_matrix, int tile_rows) {
  return tile_rows == 2 ? (shared_matrix ? 4 : 2) : (shared_matrix ? 7 : 4);
}

//: Blocks of TileRows tile rows by one tile column that cover the upper triangle (tile row
//: <= tile column) of a side x side grid of tiles: block row P (tile rows TileRows P on)
//: holds the side - TileRows P columns from TileRows P on.
__host__ __device__ constexpr long long upper_blocks(long long side, int tile_rows) {
  const long long block_rows = (side + tile_rows - 1) / tile_rows;
  return block_rows * side - tile_rows * block_rows * (block_rows - 1) / 2;
}

//: Blocks an SM each variant is compiled for (above). A macro, for __launch_bounds__ (see
//: TP_BLOCK_THREADS).
#define TP_BLOCKS_PER_SM(shared_matrix) ((shared_matrix) ? 1 : 2)
//: The same for the merge objective's (cluster, token) tiles: 5 * 256 tiles a round, one
//: round for K = 98, N = 197 (25 x 50 tiles).
constexpr int kMergeRoundTiles = 5;

//: Row stride of the raw (token-major) feature buffers: 8 mod 32, so that a warp reading
//: 8 features of 4 consecutive tokens (centre_stage) hits 32 distinct banks,
//: 8 r + q + const.
constexpr int kRawStride = kFeatureChunk + 8;

//: The stage of fill_matrix is tile-major: the kFeatureChunk x kTile values of the tokens of
//: one tile (group g: tokens kTile g ... kTile g + kTile - 1) lie together, feature after
//: feature, so a tile's values at feature q are kTile consecutive elements at a fixed offset
//: q * kTile from the group's start: the distance loop addresses them with immediates, no
//: pointer steps. Groups are kStageGroupStride elements apart: one kTile-element quad more
//: than the group, so that 8 consecutive groups' quads at one feature fall in 8 distinct
//: bank quads (the column loads of a quarter-warp: conflict-free).
constexpr int kStageGroupStride = kFeatureChunk * kTile + kTile;

//: Features the distance loop takes per step of one tile slot (its loads issued together,
//: ahead of their FP32 work; one address step a step).
constexpr int kFeatureUnroll = 8;

// kTile values of the stage, loaded at once (one 128-bit load for float).
template <typename Acc>
struct alignas(16) TileValues {
  Acc v[kTile];
};

//: Marks "no cluster" in the token -> cluster-of-its-medoid map (any value >= K works).
constexpr int kNotAMedoid = 0x7FFFFFFF;

//: The two counts of the shared variant's iteration lists (Problem::counts): medoids the last
//: update moved, tokens the assignment searches in full.
constexpr int kMovedCount = 0;
constexpr int kSearchCount = 1;
//: The assignment compares only the moved medoids when at most 1 in kMovedShare of the
//: clusters moved (the measured updates move 16-37 of 98 first, then 3-10, then 0-2); with
//: more, the tokens of moved clusters, searched in full, cost more than one scan of all.
constexpr int kMovedShare = 8;

// The 16-bit inputs, as their bits (the layout of __half and __nv_bfloat16). Converting
// them here, rather than with cuda_fp16.h, keeps the source free of CUDA headers (NVRTC
// then needs no include path) and lets the host build run the very same conversion.
struct Half {
  unsigned short bits;  // IEEE 754 binary16
};
struct BFloat16 {
  unsigned short bits;  // the upper half of a float32
};

// float32 accumulation for every float input; float64 only for float64 (tests).
template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
//: Whether T's values are staged as they are (no conversion): then a copy can be asynchronous.
template <typename T> constexpr bool kStagedAsIs = false;
template <> constexpr bool kStagedAsIs<float> = true;
template <> constexpr bool kStagedAsIs<double> = true;

__device__ __forceinline__ float to_accumulator(float v) { return v; }
__device__ __forceinline__ double to_accumulator(double v) { return v; }
__device__ __forceinline__ float to_accumulator(BFloat16 v) {
  return __int_as_float(static_cast<int>(static_cast<unsigned int>(v.bits) << 16));
}
// Exact: every binary16 value is a float32 value.
__device__ __forceinline__ float to_accumulator(Half v) {
  const unsigned int sign = static_cast<unsigned int>(v.bits & 0x8000u) << 16;
  const unsigned int exponent = (v.bits >> 10) & 0x1Fu;
  const unsigned int mantissa = v.bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  const unsigned int bits = exponent == 0x1Fu
      ? sign | 0x7F800000u | (mantissa << 13)  // infinity or NaN
      : sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  return __int_as_float(static_cast<int>(bits));
}

// Explicit fused multiply-adds: the GPU and the host emulation then round identically.
__device__ __forceinline__ float multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double multiply_add(double a, double b, double c) {
  return fma(a, b, c);
}

template <typename Acc> __device__ __forceinline__ Acc infinity();
template <> __device__ __forceinline__ float infinity<float>() {
  return __int_as_float(0x7F800000);
}
template <> __device__ __forceinline__ double infinity<double>() {
  return __longlong_as_double(0x7FF0000000000000LL);
}

//: Threads per warp, and warps per block.
constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockThreads / kWarpSize;
constexpr unsigned int kFullWarp = 0xFFFFFFFFu;

// Sum of the 32 lanes' `value`, the same bits in every lane: a butterfly (lane L adds lane
// L ^ 16, then L ^ 8, ..., L ^ 1); lanes L and L ^ s add the same two numbers at each step,
// and IEEE addition is commutative, so every lane holds the same tree's sum.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
  for (int lanes = kWarpSize / 2; lanes > 0; lanes /= 2) {
    value += __shfl_xor_sync(kFullWarp, value, lanes);
  }
  return value;
}

// Sum of every thread's `value`, in a fixed order (each warp's butterfly, then the warps'
// sums in warp order), so the result is the same on every run. All threads get it; two
// barriers. `scratch` holds kWarps values.
template <typename Acc>
__device__ Acc block_sum(Acc value, Acc* scratch) {
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  Acc total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused at once
  return total;
}

// A key whose unsigned order is the numeric order of the (non-NaN) value, with -0 equal to
// +0 (x + 0 turns -0 into +0 and leaves every other value as it is): the least cost of a
// cluster is then one atomicMin, whatever order the threads come in.
__device__ __forceinline__ unsigned long long order_key(float value) {
  const unsigned int bits = __float_as_uint(value + 0.0f);
  return bits >> 31 ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ unsigned long long order_key(double value) {
  const unsigned long long bits =
      static_cast<unsigned long long>(__double_as_longlong(value + 0.0));
  return bits >> 63 ? ~bits : bits | 0x8000000000000000ULL;
}
//: No key yet (above every order_key of a value below infinity).
constexpr unsigned long long kNoKey = ~0ULL;

// The value of an order_key (-0 comes back as +0).
template <typename Acc> __device__ __forceinline__ Acc from_order_key(unsigned long long key);
template <> __device__ __forceinline__ float from_order_key<float>(unsigned long long key) {
  const unsigned int bits = static_cast<unsigned int>(key);
  return __int_as_float(static_cast<int>(bits >> 31 ? bits & 0x7FFFFFFFu : ~bits));
}
template <> __device__ __forceinline__ double from_order_key<double>(unsigned long long key) {
  return __longlong_as_double(
      static_cast<long long>(key >> 63 ? key & 0x7FFFFFFFFFFFFFFFULL : ~key));
}

// Asynchronous copies of single elements from global to shared memory, in commit groups:
// cp.async on sm_80 and later for 4- and 8-byte elements; a plain load and store elsewhere
// (2-byte elements, older devices), where commit and wait are no-ops. The host emulation
// defers each copy to the wait that covers it (host_emulation.h), as the hardware may, so a
// read before its wait fails the tests there too.
template <typename T>
__device__ __forceinline__ void copy_async(T* shared_target, const T* source) {
#if defined(TP_HOST_EMULATION)
  tp_host::copy_async(shared_target, source, sizeof(T));
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
    unsigned int target;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
        : "=r"(target) : "l"(shared_target));
    unsigned long long global;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(global) : "l"(source));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(target), "l"(global),
                 "n"(sizeof(T)) : "memory");
    return;
  }
#endif
  *shared_target = *source;
#endif
}

// 16 bytes, as copy_async does (cp.async.cg on sm_80 and later; a plain 16-byte load and
// store elsewhere): both addresses 16-byte aligned, which the caller checks.
struct alignas(16) Bytes16 {
  unsigned int words[4];
};
template <typename T>
__device__ __forceinline__ void copy_async_16(T* shared_target, const T* source) {
#if defined(TP_HOST_EMULATION)
  tp_host::copy_async(shared_target, source, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned int target;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
      : "=r"(target) : "l"(shared_target));
  unsigned long long global;
  asm("cvta.to.global.u64 %0, %1;" : "=l"(global) : "l"(source));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(target), "l"(global)
               : "memory");
#else
  *reinterpret_cast<Bytes16*>(shared_target) = *reinterpret_cast<const Bytes16*>(source);
#endif
}

// Closes this thread's group of copies.
__device__ __forceinline__ void commit_copies() {
#if defined(TP_HOST_EMULATION)
  tp_host::commit_copies();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's groups are still in flight. Other threads
// see the copies only after a barrier.
template <int Pending>
__device__ __forceinline__ void wait_copies() {
#if defined(TP_HOST_EMULATION)
  tp_host::wait_copies(Pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
#endif
}

// Carves one block's dynamic shared memory. The widest arrays come first, so that every
// array is aligned for its type. The Python glue (backends/_cupy.py, kmedoids_shared_bytes)
// reproduces `bytes()`; a test compares the two through the host build.
//
// First a region for fill_matrix: the stage (tile_side() groups of kStageGroupStride, see
// kStageGroupStride) of centred features and, with the matrix in shared memory, two raw
// buffers (N, kRawStride) of tokens' features as they come; then, with the matrix in shared
// memory, the (N, matrix_stride) distances. fill_matrix stores the
// distances only after its last feature, so when it runs in one round the matrix overlays
// the region (the larger of the two). Then each cluster's least cost key (K, 8 bytes), the
// weights and medoid costs (N each), the reduction scratch (kWarps); four int arrays
// (labels and the medoid of each token: N; medoids and each cluster's best member: K); with
// the matrix in shared memory, each cluster's members as a bit set (K, member_words()), the
// clusters whose medoid moved (K), the tokens to search in full (N) and their two counts.
template <typename T>
struct KMedoidsLayout {
  using Acc = typename Accumulator<T>::type;
  int n, k;
  bool shared_matrix;  // the N x N distances live in shared memory (else in a workspace)
  int tile_rows;       // fill_matrix's blocks: tile rows by one tile column (1 or 2)

  // Tiles of kTile tokens along a side of the matrix (= the stage's groups).
  __device__ int tile_side() const { return (n + kTile - 1) / kTile; }
  // Odd, so that the mirrored stores of fill_matrix hit distinct banks.
  __device__ int matrix_stride() const { return n | 1; }
  __device__ long long rounds() const {
    const long long per_round = round_blocks(shared_matrix, tile_rows) * kBlockThreads;
    return (upper_blocks(tile_side(), tile_rows) + per_round - 1) / per_round;
  }
  __device__ long long stage_count() const {
    return static_cast<long long>(tile_side()) * kStageGroupStride;
  }
  __device__ long long raw_count() const {  // elements of T in one raw buffer
    return static_cast<long long>(n) * kRawStride;
  }
  __device__ static long long round16(long long bytes) { return (bytes + 15) / 16 * 16; }
  // Two raw buffers only where the matrix is in shared memory: one block an SM, which must
  // overlap its own loads with its compute (in the global variant other blocks do).
  __device__ long long fill_bytes() const {
    return round16(stage_count() * static_cast<long long>(sizeof(Acc)) +
                   (shared_matrix ? 2 * raw_count() * static_cast<long long>(sizeof(T)) : 0));
  }
  __device__ long long matrix_bytes() const {
    return shared_matrix
        ? round16(static_cast<long long>(n) * matrix_stride() * static_cast<long long>(sizeof(Acc)))
        : 0;
  }
  __device__ bool matrix_overlays_fill() const { return shared_matrix && rounds() == 1; }
  __device__ long long region_bytes() const {
    if (!matrix_overlays_fill()) return fill_bytes() + matrix_bytes();
    return fill_bytes() > matrix_bytes() ? fill_bytes() : matrix_bytes();
  }
  // 32-bit words of one cluster's member set (a bit a token); none in the global variant.
  __device__ int member_words() const { return shared_matrix ? (n + 31) / 32 : 0; }
  __device__ long long bytes() const {
    const long long lists = shared_matrix ? k + n + 2LL : 0;  // moved, search, counts
    return region_bytes() + 8LL * k +
           (2LL * n + kWarps) * static_cast<long long>(sizeof(Acc)) +
           (2LL * n + 2LL * k + static_cast<long long>(k) * member_words() + lists) * 4;
  }
};

// The merge kernel's block: a stage of one chunk of features of the tokens (columns
// [0, token_columns)) and of the pooled tokens (from token_columns), each side padded to whole
// tiles and the row stride to 8 mod 32 (conflict-free 8 x 4 warp stores, as in
// KMedoidsLayout); with the objective, each token's nearest-distance key (N, 8 bytes); the
// per-token effective weights, per-cluster totals, reduction scratch; labels, members in
// cluster order (N each), cluster starts (K + 1).
template <typename Acc>
struct MergeLayout {
  int n, k;
  bool with_objective;

  __device__ int token_columns() const { return (n + kTile - 1) / kTile * kTile; }
  __device__ int stride() const {
    const int columns = token_columns() + (k + kTile - 1) / kTile * kTile;
    return columns <= 8 ? 8 : (columns - 8 + 31) / 32 * 32 + 8;
  }
  __device__ long long stage_count() const {
    return static_cast<long long>(stride()) * kFeatureChunk;
  }
  __device__ long long key_count() const { return with_objective ? n : 0; }
  __device__ long long acc_count() const {
    // stage, effective weights, cluster totals, reduction scratch
    return stage_count() + n + k + kWarps;
  }
  __device__ long long int_count() const {
    return 2LL * n + k + 1;  // labels, members in cluster order, cluster starts
  }
  __device__ long long bytes() const {
    return acc_count() * static_cast<long long>(sizeof(Acc)) + 8LL * key_count() +
           int_count() * 4LL;
  }
};

}  // namespace tokenpool
