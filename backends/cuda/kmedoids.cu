// (Weighted) K-Medoids for Token Pooling (Marin et al., §4 and Appendix A), one thread block
// per problem, the whole iteration loop in one launch (`kmedoids`); and the rest of
// Algorithm 1 (line 6: weighted cluster means; output sizes; the objective) in a second
// launch (`merge`), for any clustering's labels.
//
// Rules, identical to the generic array-API code (tokenpool_ops/_clustering.py):
// * assignment (Eq. 16): the nearest medoid, the lowest cluster index on ties; a medoid is
//   always assigned to its own cluster (the lowest one, should init repeat a token);
// * medoid update (Eq. 17, weights inside): the member of least sum_j w_j d(i, j); the
//   current medoid stays unless a member is strictly better; the lowest index among equals;
// * each problem stops at its fixed point (no label changed) and repeats its final objective
//   in the history, which is what the generic loop computes for it.
// Robust to any input (NaN, infinity, overflow to infinity, init out of range when checks
// are off): labels are always in [0, K), medoids in [0, N) and distinct whenever init is,
// every loop is bounded, every access in range. A NaN is never "nearer" nor "cheaper".
//
// Distances are those of the centred tokens a_i = x_i - mean, in the Gram form of the generic
// path (tokenpool_ops/_primitives.py, self_sq_distances, and the CPU Numba kernels):
// d(i, j) = (|a_i|^2 + |a_j|^2) - 2 a_i.a_j clamped at 0, computed once for i < j and
// mirrored (symmetric to the bit), 0 on the diagonal; each dot product and squared norm
// summed over the features in feature order (one FMA a pair and feature), in register tiles
// from features staged in shared memory, and stored once (fill_matrix). So on integer tokens
// of mean zero (every product and sum exact) the distances, and so the labels, medoids and
// history, are the generic path's bit for bit; on real-valued tokens they agree with it up
// to rounding (its matrix product sums in another order), as the CPU Numba kernels do.
// The centring keeps the cancellation of the Gram form small for tokens far from the origin.
// The matrix (row stride N | 1) lives
// * in shared memory where it fits (SharedMatrix; float32 N <= 236 in the 227 KiB of
//   Hopper, 201 on Ampere, for small K: 231 and 195 at K = N), so every later distance is
//   a shared-memory read;
// * else in a global workspace (B, N, N | 1), read through L2 with the same access patterns
//   (float32 N up to about 1120 on Ampere and 1570 on Hopper, where a chunk of every token's
//   features still fits in shared memory for the tiles; the glue declines larger N).
// Both give the same bits: the code is the same but for where the matrix is (and how the
// medoid update finds a cluster's members: a bit set, or a scan of the labels).
// benchmarks/README.md models the speed (bytes, FLOPs, wavefronts, barriers, registers).
#if defined(__CUDACC__)
// Dynamic shared memory; host_emulation.h defines the same name for the CPU build.
#define TP_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include "device_helpers.cuh"

namespace tokenpool {

// One problem's view: its slices of the inputs and its shared-memory arrays.
template <typename T>
struct Problem {
  using Acc = typename Accumulator<T>::type;
  int n, m, k;
  int matrix_stride;  // of the matrix's rows: N or N + 1, odd
  int raw_count;  // elements of one raw buffer
  const T* __restrict__ x;      // (N, M)
  const Acc* __restrict__ mean;  // (M,)
  Acc* matrix;    // (N, matrix_stride) distances: in shared memory or the global workspace
  // shared memory
  Acc* stage;     // (tile side, kStageGroupStride) centred features, tile-major
  T* raw;         // two (N, kRawStride) buffers of features as they come
  Acc* weights;   // (N,)
  Acc* cost;      // (N,) cost of each token as its cluster's medoid (Eq. 17)
  Acc* norms;     // (N,) |a_i|^2 of the centred tokens, during fill_matrix (cost's memory)
  Acc* scratch;   // (kWarps,)
  unsigned long long* best_key;  // (K,) order_key of each cluster's least member cost
  int* labels;    // (N,)
  int* medoid_of; // (N,) cluster whose medoid the token is, kNotAMedoid otherwise
  int* medoids;   // (K,)
  int* best_member;  // (K,) the lowest member of that cost
  // (K, member_words) each cluster's members, bit i % 32 of word i / 32 for token i (with
  // the matrix in shared memory); nullptr in the global variant, which scans the labels.
  unsigned int* members;
  int member_words;
  // With the matrix in shared memory (else nullptr): the clusters whose medoid the last
  // update moved (K, in any order), the tokens assign searches in full (N), and their two
  // counts (kMovedCount, kSearchCount).
  int* moved;
  int* search;
  int* counts;

  __device__ Acc distance(int i, int j) const { return matrix[i * matrix_stride + j]; }
  __device__ Acc to_medoid(int c, int i) const {
    return matrix[medoids[c] * matrix_stride + i];
  }
};

// `workspace` is this problem's (N, N) slice of the global workspace, unless SharedMatrix.
template <typename T, bool SharedMatrix, int TileRows>
__device__ Problem<T> carve(unsigned char* shared, int n, int m, int k, const T* x,
                            const typename Accumulator<T>::type* mean,
                            typename Accumulator<T>::type* workspace) {
  using Acc = typename Accumulator<T>::type;
  const KMedoidsLayout<T> layout{n, k, SharedMatrix, TileRows};
  Problem<T> p;
  p.n = n;
  p.m = m;
  p.k = k;
  p.x = x;
  p.mean = mean;
  p.matrix_stride = layout.matrix_stride();
  p.raw_count = static_cast<int>(layout.raw_count());
  p.stage = reinterpret_cast<Acc*>(shared);
  p.raw = reinterpret_cast<T*>(p.stage + layout.stage_count());
  unsigned char* const shared_matrix =
      shared + (layout.matrix_overlays_fill() ? 0 : layout.fill_bytes());
  p.matrix = SharedMatrix ? reinterpret_cast<Acc*>(shared_matrix) : workspace;
  p.best_key = reinterpret_cast<unsigned long long*>(shared + layout.region_bytes());
  p.weights = reinterpret_cast<Acc*>(p.best_key + k);
  p.cost = p.weights + n;
  p.norms = p.cost;  // the costs are first written after the fill
  p.scratch = p.cost + n;
  int* ints = reinterpret_cast<int*>(p.scratch + kWarps);
  p.labels = ints;
  p.medoid_of = p.labels + n;
  p.medoids = p.medoid_of + n;
  p.best_member = p.medoids + k;
  p.member_words = layout.member_words();
  p.members = SharedMatrix ? reinterpret_cast<unsigned int*>(p.best_member + k) : nullptr;
  p.moved = SharedMatrix ? reinterpret_cast<int*>(p.members + k * p.member_words) : nullptr;
  p.search = SharedMatrix ? p.moved + k : nullptr;
  p.counts = SharedMatrix ? p.search + n : nullptr;
  return p;
}

// Block t of the upper triangle's blocks of TileRows tile rows by one tile column (see
// upper_blocks), rows first: block row P holds side - TileRows P blocks, from tile column
// TileRows P on, so t = P side - TileRows P (P - 1) / 2 + (column - TileRows P). Every tile
// of the upper triangle (tile row <= tile column) is in exactly one block; a block's tiles
// below the diagonal or past the last tile row hold nothing that is stored (store_tile).
template <int TileRows>
__device__ __forceinline__ void upper_block(int t, int side, int* block_row, int* column) {
  auto first = [side](int i) { return i * side - TileRows * i * (i - 1) / 2; };
  const int block_rows = (side + TileRows - 1) / TileRows;
  // The root of first(i) = t, exact in float (side <= kMaxTokens / kTile: every value
  // below 2^24, and the discriminant at least 9).
  const float b = 2.0f * side + TileRows;
  int i = static_cast<int>((b - sqrtf(b * b - 8.0f * TileRows * t)) / (2.0f * TileRows));
  i = i < 0 ? 0 : i > block_rows - 1 ? block_rows - 1 : i;
  while (i > 0 && first(i) > t) --i;  // sqrtf may round either way: settle exactly
  while (i < block_rows - 1 && first(i + 1) <= t) ++i;
  *block_row = i;
  *column = TileRows * i + (t - first(i));
}

// The top tile row and the tile column (element offsets in the stage) of this thread's
// RoundBlocks blocks in the round of blocks that starts at `first`; -1 for a slot past the
// last block. Consecutive threads take consecutive blocks (rows first), so a warp mostly
// shares its tile rows: their loads are broadcasts.
template <int RoundBlocks, int TileRows>
__device__ __forceinline__ void round_blocks_of_thread(int first, int blocks, int side,
                                                       int* rows, int* columns) {
TP_UNROLL
  for (int j = 0; j < RoundBlocks; ++j) {
    const int t = first + j * kBlockThreads + static_cast<int>(threadIdx.x);
    rows[j] = columns[j] = -1;
    if (t < blocks) {
      upper_block<TileRows>(t, side, &rows[j], &columns[j]);
      rows[j] *= TileRows * kTile;
      columns[j] *= kTile;
    }
  }
}

// Slots of this round that hold a block in some thread: the same for the whole block, so
// the loops over blocks stop with a uniform branch. A thread whose slot is past the last
// block (the last slot's tail) sums block 0 instead, which costs nothing and is never
// stored.
__device__ __forceinline__ int used_slots(int first, int blocks, int round_blocks) {
  const int slots = (blocks - first + kBlockThreads - 1) / kBlockThreads;
  return slots < round_blocks ? slots : round_blocks;
}

// Starts copying features [start, start + width) of every token into `raw` (token-major,
// row stride kRawStride): asynchronous on sm_80+ (cp.async), see copy_async. Consecutive
// threads take consecutive features of a token: coalesced reads, and for a whole chunk
// (width = kFeatureChunk) each warp writes one raw row, 32 consecutive words (no conflict).
// A whole chunk (every chunk but a last, partial one) goes 16 bytes a copy where the rows
// allow it (x 16-byte aligned, M a multiple of the elements in 16 bytes; the raw rows are:
// kRawStride * sizeof(T) is a multiple of 16, see the static_assert), else one feature of a
// token a lane, a warp a token (no division).
template <typename T>
__device__ void start_chunk(const Problem<T>& p, int start, int width, T* raw) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(T));  // elements a 16-byte copy
  constexpr int kVectors = kFeatureChunk / kVector;           // 16-byte copies a token
  static_assert(kRawStride * sizeof(T) % 16 == 0 && kFeatureChunk % kVector == 0,
                "raw rows in 16-byte pieces");
  const bool whole = width == kFeatureChunk;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (whole && p.m % kVector == 0 && reinterpret_cast<unsigned long long>(p.x) % 16 == 0) {
    // Uniform. A warp takes kTokens tokens a step, each lane the same 16 bytes of each.
    constexpr int kTokens = kWarpSize / kVectors;
    static_assert(kWarpSize % kVectors == 0, "whole tokens a warp");
    const int q = lane % kVectors * kVector;
    for (int i = warp * kTokens + lane / kVectors; i < p.n; i += kWarps * kTokens) {
      copy_async_16(raw + i * kRawStride + q, p.x + static_cast<long long>(i) * p.m + start + q);
    }
  } else if (whole) {
    static_assert(kFeatureChunk == kWarpSize, "a warp copies a token's chunk");
    for (int i = warp; i < p.n; i += kWarps) {
      copy_async(raw + i * kRawStride + lane, p.x + static_cast<long long>(i) * p.m + start + lane);
    }
  } else {
    for (int e = threadIdx.x; e < p.n * width; e += kBlockThreads) {
      const int i = e / width, q = e % width;
      copy_async(raw + i * kRawStride + q, p.x + static_cast<long long>(i) * p.m + start + q);
    }
  }
  commit_copies();
}

// The stage from one chunk of features [start, start + width): each token's value converted
// to the accumulator type and centred, at stage element g * kStageGroupStride + q * kTile + r
// for token kTile g + r (zero for the padding tokens of the last group). From the raw buffer
// (`raw`, row stride kRawStride: the pipelined fill) or else straight from global memory
// (the global variant, where the other block on the SM computes while this one loads).
// A warp takes one group's kTile tokens x kSpan = 8 features (lane: r = lane / 8,
// q = lane mod 8 + const): its stage stores are 32 distinct banks (kTile q + r + const), its
// raw reads too (row stride 8 mod 32: 8 r + q + const), and its global reads are one 32-byte
// sector a token. In a whole chunk from the raw buffer each thread keeps one feature (and its
// mean) throughout; the global variant takes the general path (with the other, its 128
// registers spill on sm_80).
template <typename T>
__device__ void centre_stage(const Problem<T>& p, int start, int width, const T* raw) {
  using Acc = typename Accumulator<T>::type;
  constexpr int kSpan = kWarpSize / kTile;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int r = lane / kSpan;
  const int groups = (p.n + kTile - 1) / kTile;
  auto centre = [&](int group, int q, Acc mean) {
    const int i = group * kTile + r;
    Acc value = 0;
    if (i < p.n) {
      value = to_accumulator(raw != nullptr ? raw[i * kRawStride + q]
                                            : p.x[static_cast<long long>(i) * p.m + start + q]) -
              mean;
    }
    p.stage[group * kStageGroupStride + q * kTile + r] = value;
  };
  if (width == kFeatureChunk && raw != nullptr) {  // uniform; warp w: span w mod kSpans
    constexpr int kSpans = kFeatureChunk / kSpan;
    static_assert(kWarps % kSpans == 0, "each warp keeps one span");
    const int q = warp % kSpans * kSpan + lane % kSpan;
    const Acc mean = p.mean[start + q];
    // The groups whose token r exists (every group but perhaps the last) first, without a
    // bound test an element (SASS: 33 instructions for 4 elements with it, 20 without);
    // then the padding's zeros.
    const int with_token = (p.n - r + kTile - 1) / kTile;  // groups g with kTile g + r < n
    int group = warp / kSpans;
    for (; group < with_token; group += kWarps / kSpans) {
      p.stage[group * kStageGroupStride + q * kTile + r] =
          to_accumulator(raw[(group * kTile + r) * kRawStride + q]) - mean;
    }
    for (; group < groups; group += kWarps / kSpans) {
      p.stage[group * kStageGroupStride + q * kTile + r] = Acc(0);
    }
  } else {  // a last, partial chunk
    const int spans = (width + kSpan - 1) / kSpan;
    for (int slot = warp; slot < groups * spans; slot += kWarps) {
      const int group = slot / spans, q = slot % spans * kSpan + lane % kSpan;
      if (q < width) centre(group, q, p.mean[start + q]);
    }
  }
}

// v[s] for a lane-dependent s, by selection (a dynamic index would put v in local memory).
template <typename Acc>
__device__ __forceinline__ Acc pick(const Acc (&v)[kTile], int s) {
  return s == 0 ? v[0] : s == 1 ? v[1] : s == 2 ? v[2] : v[3];
}

// A tile's dot products a_i.a_j become distances, (|a_i|^2 + |a_j|^2) - 2 a_i.a_j (the
// generic sq_distances, in its order: an overflow shows as an infinity or a NaN, never as a
// finite value, see tokenpool_ops/_overflow.py), clamped at 0 against rounding (a NaN stays
// NaN, as the generic clip does). Cells past the last token (norm 0 here) are never stored.
template <typename T>
__device__ __forceinline__ void tile_distances(const Problem<T>& p, int row, int column,
                                               typename Accumulator<T>::type (&sum)[kTile][kTile]) {
  using Acc = typename Accumulator<T>::type;
  Acc row_norms[kTile], column_norms[kTile];
TP_UNROLL
  for (int t = 0; t < kTile; ++t) {
    row_norms[t] = row + t < p.n ? p.norms[row + t] : Acc(0);
    column_norms[t] = column + t < p.n ? p.norms[column + t] : Acc(0);
  }
TP_UNROLL
  for (int r = 0; r < kTile; ++r) {
TP_UNROLL
    for (int s = 0; s < kTile; ++s) {
      const Acc d = (row_norms[r] + column_norms[s]) - Acc(2) * sum[r][s];
      sum[r][s] = d < Acc(0) ? Acc(0) : d;
    }
  }
}

// Stores one tile of distances (upper triangle, i < j, and its mirror j, i, so the matrix is
// symmetric by construction; zero on the diagonal). Lanes are staggered by (lane / 8): at
// each step lane L writes cell (u + L / 8) mod 4 of its row, so a warp of one tile row
// writes 32 distinct banks, in the direct store (bank 4 (L mod 8) + (u + L / 8) mod 4 +
// const) and in the mirrored one (bank 4 (P L mod 8) + ..., a permutation since the row
// stride P is odd).
template <typename T>
__device__ void store_tile(const Problem<T>& p, int row, int column,
                           const typename Accumulator<T>::type (&sum)[kTile][kTile]) {
  using Acc = typename Accumulator<T>::type;
  const int stagger = static_cast<int>(threadIdx.x % kWarpSize) / 8;
TP_UNROLL
  for (int r = 0; r < kTile; ++r) {
TP_UNROLL
    for (int u = 0; u < kTile; ++u) {
      const int s = (u + stagger) % kTile;
      const int i = row + r, j = column + s;
      if (i < j && j < p.n) p.matrix[i * p.matrix_stride + j] = pick(sum[r], s);
      if (i == j && i < p.n) p.matrix[i * p.matrix_stride + i] = Acc(0);
    }
  }
TP_UNROLL
  for (int s = 0; s < kTile; ++s) {
    Acc column_values[kTile];
TP_UNROLL
    for (int r = 0; r < kTile; ++r) column_values[r] = sum[r][s];
TP_UNROLL
    for (int u = 0; u < kTile; ++u) {
      const int r = (u + stagger) % kTile;
      const int i = row + r, j = column + s;
      if (i < j && j < p.n) p.matrix[j * p.matrix_stride + i] = pick(column_values, r);
    }
  }
}

// sum[r][s] += a[r] b[s] over one tile: one feature of a 4 x 4 tile's dot products, one FMA a
// cell (the fill's Gram form).
template <typename Acc>
__device__ __forceinline__ void add_tile_dot(const TileValues<Acc>& a, const TileValues<Acc>& b,
                                             Acc (&sum)[kTile][kTile]) {
TP_UNROLL
  for (int r = 0; r < kTile; ++r) {
TP_UNROLL
    for (int s = 0; s < kTile; ++s) sum[r][s] = multiply_add(a.v[r], b.v[s], sum[r][s]);
  }
}

// sum[r][s] += (a[r] - b[s])^2 over one tile: one feature of a 4 x 4 tile's squared distances
// from the differences (the merge objective's pooled tokens x tokens).
template <typename Acc>
__device__ __forceinline__ void add_tile_feature(const TileValues<Acc>& a,
                                                 const TileValues<Acc>& b,
                                                 Acc (&sum)[kTile][kTile]) {
TP_UNROLL
  for (int r = 0; r < kTile; ++r) {
TP_UNROLL
    for (int s = 0; s < kTile; ++s) {
      const Acc diff = a.v[r] - b.v[s];
      sum[r][s] = multiply_add(diff, diff, sum[r][s]);
    }
  }
}

// The running sums of one thread's blocks over the features of the stage (one chunk), slot
// by slot: `row_values[j][r]` and `column_values[j]` point at the stage groups of slot j's
// tile row r and tile column (the same for every chunk); the column's values serve every
// tile row (TileRows + 1 loads for TileRows * 16 cells a feature). Within a slot,
// kFeatureUnroll features a step, each tile's values at a fixed offset from the pointers
// (immediates in the loads, one address step a step), their loads issued together ahead of
// the arithmetic. Each cell still sums its features in feature order: the order of the
// slots and tile rows does not change any sum.
template <typename Acc, int RoundBlocks, int TileRows>
__device__ __forceinline__ void add_chunk(
    int width, int slots, const TileValues<Acc>* const (&row_values)[RoundBlocks][TileRows],
    const TileValues<Acc>* const (&column_values)[RoundBlocks],
    Acc (&sum)[RoundBlocks][TileRows][kTile][kTile]) {
TP_UNROLL
  for (int j = 0; j < RoundBlocks; ++j) {
    if (j >= slots) break;  // uniform across the block
    const TileValues<Acc>* const (&a)[TileRows] = row_values[j];
    const TileValues<Acc>* b = column_values[j];
    int q = 0;
TP_LOOP
    for (; q + kFeatureUnroll <= width; q += kFeatureUnroll) {
      TileValues<Acc> row_tile[kFeatureUnroll][TileRows], column_tile[kFeatureUnroll];
TP_UNROLL
      for (int u = 0; u < kFeatureUnroll; ++u) {
TP_UNROLL
        for (int r = 0; r < TileRows; ++r) row_tile[u][r] = a[r][q + u];
        column_tile[u] = b[q + u];
      }
TP_UNROLL
      for (int u = 0; u < kFeatureUnroll; ++u) {
TP_UNROLL
        for (int r = 0; r < TileRows; ++r) add_tile_dot(row_tile[u][r], column_tile[u], sum[j][r]);
      }
    }
TP_LOOP
    for (; q < width; ++q) {  // a last, partial chunk
TP_UNROLL
      for (int r = 0; r < TileRows; ++r) add_tile_dot(a[r][q], b[q], sum[j][r]);
    }
  }
}

// Each token's squared norm |a_i|^2 over one chunk of the stage, added to its running sum in
// p.norms (from 0 at the first chunk), in feature order: the bits of the dot product
// a_i.a_i in its diagonal tile. A thread a token; a warp reads 8 groups' quads at one
// feature: words 132 g + 4 q + r, 32 distinct banks.
template <typename T>
__device__ void add_norms(const Problem<T>& p, int start, int width) {
  using Acc = typename Accumulator<T>::type;
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    const Acc* values = p.stage + i / kTile * kStageGroupStride + i % kTile;
    Acc norm = start == 0 ? Acc(0) : p.norms[i];
    if (width == kFeatureChunk) {  // uniform
TP_UNROLL
      for (int q = 0; q < kFeatureChunk; ++q) {
        norm = multiply_add(values[q * kTile], values[q * kTile], norm);
      }
    } else {
      for (int q = 0; q < width; ++q) {
        norm = multiply_add(values[q * kTile], values[q * kTile], norm);
      }
    }
    p.norms[i] = norm;
  }
}

// All N x N distances into the matrix (shared or global), each stored once. Each thread
// owns RoundBlocks blocks of TileRows x 1 tiles (kTile x kTile cells each) of the upper
// triangle per round (one round for N <= 236 with 4 x 4 tiles, 252 with pairs, in the shared
// variant; 176 with either in the global one) and sums each cell's dot
// product a_i.a_j of the centred tokens over all M features in feature order, in registers;
// the first round also sums each token's |a_i|^2 (add_norms). Each cell then becomes
// (|a_i|^2 + |a_j|^2) - 2 a_i.a_j clamped at 0 (tile_distances), stored at (i, j) and
// mirrored at (j, i): the same bits in either variant and for any tile assignment, and the
// matrix symmetric to the bit. Features come kFeatureChunk at a time. Pipelined (the
// shared variant, one block an SM): through two raw buffers, chunk c + 1 copied (cp.async)
// while chunk c is centred and used; else straight from global memory, while the SM's other
// block computes. Two barriers a chunk.
template <typename T, int RoundBlocks, int TileRows, bool Pipelined>
__device__ void fill_matrix(const Problem<T>& p) {
  using Acc = typename Accumulator<T>::type;
  const int side = (p.n + kTile - 1) / kTile;
  const int blocks = static_cast<int>(upper_blocks(side, TileRows));
  const int chunks = (p.m + kFeatureChunk - 1) / kFeatureChunk;
  auto width_at = [&p](int start) {
    return p.m - start < kFeatureChunk ? p.m - start : kFeatureChunk;
  };
  for (int first = 0; first < blocks; first += RoundBlocks * kBlockThreads) {
    int rows[RoundBlocks], columns[RoundBlocks];
    round_blocks_of_thread<RoundBlocks, TileRows>(first, blocks, side, rows, columns);
    // Each slot's tile groups in the stage (block 0 for a slot past the last block). A tile
    // row past the last group (odd side) reads the last one's: never stored.
    const TileValues<Acc>* row_values[RoundBlocks][TileRows];
    const TileValues<Acc>* column_values[RoundBlocks];
TP_UNROLL
    for (int j = 0; j < RoundBlocks; ++j) {
      const int group = rows[j] < 0 ? 0 : rows[j] / kTile;
      const int column = rows[j] < 0 ? 0 : columns[j] / kTile;
TP_UNROLL
      for (int r = 0; r < TileRows; ++r) {
        const int row_group = group + r < side ? group + r : side - 1;
        row_values[j][r] = reinterpret_cast<const TileValues<Acc>*>(
            p.stage + row_group * kStageGroupStride);
      }
      column_values[j] = reinterpret_cast<const TileValues<Acc>*>(
          p.stage + column * kStageGroupStride);
    }
    Acc sum[RoundBlocks][TileRows][kTile][kTile] = {};
    __syncthreads();  // the previous round no longer reads the stage or the raw buffers
    if (Pipelined) start_chunk(p, 0, width_at(0), p.raw);
    for (int c = 0; c < chunks; ++c) {
      const int start = c * kFeatureChunk;
      if (Pipelined) {
        if (c + 1 < chunks) {  // the other buffer, last read before the previous barrier
          const int next = start + kFeatureChunk;
          start_chunk(p, next, width_at(next), p.raw + ((c + 1) % 2) * p.raw_count);
          wait_copies<1>();  // this thread's copies of chunk c have landed
        } else {
          wait_copies<0>();
        }
      }
      __syncthreads();  // every thread's copies of chunk c; the stage is no longer read
      centre_stage(p, start, width_at(start), Pipelined ? p.raw + (c % 2) * p.raw_count : nullptr);
      __syncthreads();
      if (first == 0) add_norms(p, start, width_at(start));  // uniform: the first round only
      add_chunk<Acc, RoundBlocks, TileRows>(width_at(start),
                                            used_slots(first, blocks, RoundBlocks), row_values,
                                            column_values, sum);
    }
    __syncthreads();  // the stage and raw buffers may share memory with the matrix; norms done
TP_UNROLL
    for (int j = 0; j < RoundBlocks; ++j) {
      if (rows[j] < 0) continue;
TP_UNROLL
      for (int r = 0; r < TileRows; ++r) {
        const int row = rows[j] + r * kTile;
        tile_distances(p, row, columns[j], sum[j][r]);
        store_tile(p, row, columns[j], sum[j][r]);
      }
    }
  }
  __syncthreads();
}

// medoid_of from medoids: the lowest cluster wins a token that init repeats. Also clears
// each cluster's best member for the next update_medoids, and the member sets and the search
// list for the next assign.
template <typename T>
__device__ void index_medoids(const Problem<T>& p) {
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) p.medoid_of[i] = kNotAMedoid;
  for (int c = threadIdx.x; c < p.k; c += kBlockThreads) {
    p.best_key[c] = kNoKey;
    p.best_member[c] = kNotAMedoid;
  }
  if (p.members != nullptr) {  // uniform
    for (int e = threadIdx.x; e < p.k * p.member_words; e += kBlockThreads) p.members[e] = 0;
    if (threadIdx.x == 0) p.counts[kSearchCount] = 0;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.k; c += kBlockThreads) atomicMin(&p.medoid_of[p.medoids[c]], c);
  __syncthreads();
}

// A token's new label: written, its bit set in its cluster's member set; whether it changed.
template <typename T>
__device__ __forceinline__ int record_label(const Problem<T>& p, int i, int label) {
  const int change = label != p.labels[i];
  p.labels[i] = label;
  if (p.members != nullptr) {
    atomicOr(&p.members[label * p.member_words + i / 32], 1u << (i % 32));
  }
  return change;
}

// Whether (d, c) comes before (best, label): the least distance, then the lowest cluster
// index. The full scan in cluster order with a strict comparison keeps exactly that among the
// finite distances, so any order of candidates reaches the same label. A NaN is never before.
template <typename Acc>
__device__ __forceinline__ bool nearer(Acc d, int c, Acc best, int label) {
  return d < best || (d == best && c < label);
}

// Eq. 16 by a full scan of the medoids, a thread a token. Writes labels; returns the
// objective of Eq. 13 (sum_i w_i d(i, own medoid)) and sets *changed when a label differs
// from the previous one.
template <typename T>
__device__ typename Accumulator<T>::type assign_scan(const Problem<T>& p, int* changed) {
  using Acc = typename Accumulator<T>::type;
  Acc objective = 0;
  int any_change = 0;
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    int label = 0;
    Acc best = infinity<Acc>();
    if (p.medoid_of[i] != kNotAMedoid) {
      label = p.medoid_of[i];
      best = 0;
    } else {
      for (int c = 0; c < p.k; ++c) {
        const Acc d = p.to_medoid(c, i);
        if (d < best) {  // strict, and false for NaN: the lowest index keeps ties
          best = d;
          label = c;
        }
      }
    }
    any_change |= record_label(p, i, label);
    objective = multiply_add(p.weights[i], best, objective);
  }
  if (any_change) atomicOr(changed, 1);
  return block_sum(objective, p.scratch);  // its barriers also publish labels and *changed
}

// Eq. 16 after an update that moved few medoids (the shared variant), with the labels of
// assign_scan. A token whose cluster kept its medoid had that medoid first among the
// medoids that stayed (least distance, lowest index), so only the moved ones can take it
// over; a token of a moved cluster (or of no finite distance) goes to the search list, and
// the list is searched in full a warp a token (each lane a 32nd of the medoids, then the
// first by `nearer` over the lanes). Each token's distance waits in `cost` (free between
// updates) so that the objective is summed as assign_scan sums it: a thread's tokens in
// token order, then block_sum.
template <typename T>
__device__ typename Accumulator<T>::type assign_moved(const Problem<T>& p, int* changed,
                                                     int moved) {
  using Acc = typename Accumulator<T>::type;
  int any_change = 0;
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    int label = 0;
    Acc best = 0;
    if (p.medoid_of[i] != kNotAMedoid) {
      label = p.medoid_of[i];
    } else {
      const int kept = p.labels[i];
      label = kept;
      best = p.to_medoid(kept, i);
      bool search = !(best < infinity<Acc>());
      for (int e = 0; e < moved && !search; ++e) {
        const int c = p.moved[e];
        search = c == kept;
        const Acc d = p.to_medoid(c, i);
        if (nearer(d, c, best, label)) {
          best = d;
          label = c;
        }
      }
      if (search) {
        p.search[atomicAdd(&p.counts[kSearchCount], 1)] = i;
        continue;
      }
    }
    p.cost[i] = best;
    any_change |= record_label(p, i, label);
  }
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int searches = p.counts[kSearchCount];
  for (int e = static_cast<int>(threadIdx.x) / kWarpSize; e < searches; e += kWarps) {
    const int i = p.search[e];  // the same for the whole warp
    Acc best = infinity<Acc>();
    int label = kNotAMedoid;  // after every cluster: no finite distance yet
    for (int c = lane; c < p.k; c += kWarpSize) {
      const Acc d = p.to_medoid(c, i);
      if (d < best) {
        best = d;
        label = c;
      }
    }
    for (int lanes = kWarpSize / 2; lanes > 0; lanes /= 2) {
      const Acc other_best = __shfl_xor_sync(kFullWarp, best, lanes);
      const int other_label = __shfl_xor_sync(kFullWarp, label, lanes);
      if (nearer(other_best, other_label, best, label)) {
        best = other_best;
        label = other_label;
      }
    }
    if (lane == 0) {
      p.cost[i] = best;  // infinity where no distance is finite, as assign_scan
      any_change |= record_label(p, i, label == kNotAMedoid ? 0 : label);
    }
  }
  __syncthreads();
  Acc objective = 0;
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    objective = multiply_add(p.weights[i], p.cost[i], objective);
  }
  if (any_change) atomicOr(changed, 1);
  return block_sum(objective, p.scratch);
}

// Eq. 16. `after_update`: the medoids moved since the last assignment are in p.moved (the
// shared variant); few of them (at most 1 in kMovedShare of the clusters), and only they
// are compared (assign_moved), else every medoid (assign_scan). The same labels and
// objective either way.
template <typename T>
__device__ typename Accumulator<T>::type assign(const Problem<T>& p, int* changed,
                                               bool after_update) {
  if (after_update && p.moved != nullptr) {  // uniform
    const int moved = p.counts[kMovedCount];
    if (moved * kMovedShare <= p.k) return assign_moved(p, changed, moved);
  }
  return assign_scan(p, changed);
}

// Eq. 17 with the weights inside, over the whole block: each token's cost (one thread per
// token, its cluster's members in token order), then each cluster's cheapest member by two
// atomicMin passes (least cost key, then the lowest index of that cost). A minimum does not
// depend on the order the threads come in, and it is the member a scan in token order with
// a strict comparison would keep: the least cost, the lowest index among equals (-0 == +0);
// a NaN or infinite cost never takes part. Three barriers; index_medoids cleared the keys.
// A cluster whose medoid moves goes to p.moved (the shared variant), for assign.
template <typename T>
__device__ void update_medoids(const Problem<T>& p) {
  using Acc = typename Accumulator<T>::type;
  if (p.counts != nullptr && threadIdx.x == 0) p.counts[kMovedCount] = 0;  // read after 2 barriers
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    const int cluster = p.labels[i];
    Acc total = 0;
    // Column i: the entries the assignment read for a medoid i (the matrix is symmetric).
    if (p.members != nullptr) {  // uniform: the members from their bit set, in token order
      const unsigned int* words = p.members + cluster * p.member_words;
      for (int w = 0; w < p.member_words; ++w) {
        for (unsigned int bits = words[w]; bits != 0; bits &= bits - 1) {
          const int j = w * 32 + __ffs(static_cast<int>(bits)) - 1;
          total = multiply_add(p.weights[j], p.distance(j, i), total);
        }
      }
    } else {  // every token, in token order, the members taking part
      for (int j = 0; j < p.n; ++j) {
        if (p.labels[j] == cluster) total = multiply_add(p.weights[j], p.distance(j, i), total);
      }
    }
    p.cost[i] = total;
    if (total < infinity<Acc>()) atomicMin(&p.best_key[cluster], order_key(total));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.n; i += kBlockThreads) {
    const int cluster = p.labels[i];
    if (p.cost[i] < infinity<Acc>() && order_key(p.cost[i]) == p.best_key[cluster]) {
      atomicMin(&p.best_member[cluster], i);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.k; c += kBlockThreads) {
    const int challenger = p.best_member[c];
    // Only a member can take over (so medoids stay distinct), and only when strictly
    // cheaper: the current medoid stays on ties.
    if (challenger != kNotAMedoid && p.cost[challenger] < p.cost[p.medoids[c]]) {
      p.medoids[c] = challenger;
      if (p.moved != nullptr) p.moved[atomicAdd(&p.counts[kMovedCount], 1)] = c;
    }
  }
  __syncthreads();
}

// Token indices from init, mapped into [0, N) so that a bad index (possible only with the
// value checks off) cannot read out of bounds. 32-bit arithmetic: see kMaxTokens.
__device__ __forceinline__ int token_index(long long index, int n) {
  return index >= 0 && index < n
      ? static_cast<int>(index)
      : static_cast<int>(static_cast<unsigned int>(index) % static_cast<unsigned int>(n));
}

// SharedMatrix: where the distances live (a template parameter, so that each instantiation
// has its addresses fixed). With the matrix in shared memory a block has an SM to itself
// (160 KB at N = 197): 1 block per SM lets ptxas use up to 255 registers for the 7 x 16
// (or 4 x 32) accumulators of fill_matrix. The global variant asks for 2 blocks per SM (128
// registers, no spill), so that one block's loads overlap the other's work. TileRows: the
// shape of fill_matrix's blocks (round_blocks), which the glue picks by architecture; any
// shape gives the same bits.
// x: problem b's tokens, (N, M) contiguous, start at x + b * x_stride: N * M for a contiguous
// batch, more for the patch tokens of sequences viewed past their prefix tokens, which the
// glue then passes as they are instead of copying them (the merge takes x alike).
template <typename T, bool SharedMatrix, int TileRows>
__global__ void __launch_bounds__(TP_BLOCK_THREADS, TP_BLOCKS_PER_SM(SharedMatrix))
kmedoids(const T* __restrict__ x, long long x_stride,
         const typename Accumulator<T>::type* __restrict__ mean,
         const long long* __restrict__ init,
         const typename Accumulator<T>::type* __restrict__ weights, int n_problems, int n, int m,
         int k, int max_iter, typename Accumulator<T>::type* __restrict__ workspace,
         long long* __restrict__ labels_out, long long* __restrict__ medoids_out,
         typename Accumulator<T>::type* __restrict__ history, int* __restrict__ iterations) {
  using Acc = typename Accumulator<T>::type;
  const int problem = blockIdx.x;
  if (problem >= n_problems || n <= 0 || k <= 0 || max_iter < 0) return;  // uniform
  TP_DYNAMIC_SHARED(shared);
  __shared__ int changed;
  static_assert(valid_tile_rows(TileRows), "fill_matrix's blocks: 1 or 2 tile rows");
  const Problem<T> p = carve<T, SharedMatrix, TileRows>(
      shared, n, m, k, x + static_cast<long long>(problem) * x_stride,
      mean + static_cast<long long>(problem) * m,
      SharedMatrix ? workspace
                   : workspace + static_cast<long long>(problem) * n * (n | 1));
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    p.weights[i] = weights[static_cast<long long>(problem) * n + i];
    p.labels[i] = -1;  // differs from every label: the first assignment counts as a change
  }
  for (int c = threadIdx.x; c < k; c += kBlockThreads) {
    p.medoids[c] = token_index(init[static_cast<long long>(problem) * k + c], n);
  }
  if (threadIdx.x == 0) changed = 0;
  __syncthreads();
  fill_matrix<T, round_blocks(SharedMatrix, TileRows), TileRows, SharedMatrix>(p);
  index_medoids(p);
  Acc* const out_history = history + static_cast<long long>(problem) * (max_iter + 1);
  Acc objective = assign(p, &changed, false);
  if (threadIdx.x == 0) out_history[0] = objective;
  int done = 0;
  while (done < max_iter) {
    update_medoids(p);
    index_medoids(p);
    if (threadIdx.x == 0) changed = 0;
    __syncthreads();
    objective = assign(p, &changed, true);
    ++done;
    if (threadIdx.x == 0) out_history[done] = objective;
    const bool converged = changed == 0;  // read by all after assign's barriers
    __syncthreads();  // before thread 0 resets `changed` again
    if (converged) break;  // a fixed point: every later iteration repeats it exactly
  }
  for (int t = done + 1 + static_cast<int>(threadIdx.x); t <= max_iter; t += kBlockThreads) {
    out_history[t] = objective;
  }
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    labels_out[static_cast<long long>(problem) * n + i] = p.labels[i];
  }
  for (int c = threadIdx.x; c < k; c += kBlockThreads) {
    medoids_out[static_cast<long long>(problem) * k + c] = p.medoids[c];
  }
  if (threadIdx.x == 0) iterations[problem] = done;
}

// ---------------------------------------------------------------------------------------------
// Merge (Algorithm 1, line 6), as tokenpool_ops._merge.merge_clusters computes it:
// * cluster c's token is the mean of its members weighted by the effective weights of
//   _clustering.effective_weights: `weights` if they sum to more than zero over the
//   cluster, else `fallback` (the sizes) if those do, else ones; without `fallback` the
//   weights are used as they are, and a cluster of zero total weight (or no member) takes
//   the problem's mean;
// * its size is the sum of `carried` over its members;
// * the objective (Eq. 13) is sum_i weights_i |x_i - t_a(i)|^2, t_a(i) the pooled token
//   nearest to x_i, from the differences of the centred tokens, each of the K x N summed
//   over all features in feature order in register tiles (as fill_matrix does), each
//   token's least one by an atomicMin of order keys (order-independent).
// Features come a chunk at a time through a shared stage: the tokens' (coalesced), then the
// pooled tokens' from them, one thread per (cluster, feature), each summing its members in
// token order from shared memory. Every sum runs in a fixed order, so the result is the same
// on every run. The kernel never reads back a pooled token it wrote: each chunk of them goes
// to the stage as it goes to `tokens`. (A read-back may be compiled to a
// non-coherent ld.global.nc, which need not see this launch's writes; .ci/check_cuda.sh
// fails on any such load of a written buffer.)

// Members of each cluster in token order (`order`, from `starts[c]` to `starts[c + 1]`).
__device__ __forceinline__ void group_members(const int* labels, int n, int k, int* order,
                                              int* starts) {
  for (int c = threadIdx.x; c < k; c += kBlockThreads) {
    int count = 0;
    for (int i = 0; i < n; ++i) count += labels[i] == c;
    starts[c + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // K <= kMaxTokens small sums: one thread is fast enough
    starts[0] = 0;
    for (int c = 0; c < k; ++c) starts[c + 1] += starts[c];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < k; c += kBlockThreads) {
    int slot = starts[c];
    for (int i = 0; i < n; ++i) {
      if (labels[i] == c) order[slot++] = i;
    }
  }
  __syncthreads();
}

// Calls f(column, q) for column < columns, q < width, a warp taking 8 columns x 4 features:
// stores to a stage of stride 8 mod 32 at q * stride + column hit 32 distinct banks, and
// reads of a token-major row take 16-byte runs.
template <typename F>
__device__ __forceinline__ void for_8x4(int columns, int width, F f) {
  const int feature_groups = (width + 3) / 4;
  const int count = (columns + 7) / 8 * feature_groups * kWarpSize;
  for (int e = threadIdx.x; e < count; e += kBlockThreads) {
    const int group = e / kWarpSize, lane = e % kWarpSize;
    const int column = group / feature_groups * 8 + lane / 4;
    const int q = group % feature_groups * 4 + lane % 4;
    if (column < columns && q < width) f(column, q);
  }
}

// 2 blocks per SM (128 registers: ptxas fits the objective's 5 x 16 accumulators without
// spilling), so that one block's loads overlap the other's sums.
template <typename T>
__global__ void __launch_bounds__(TP_BLOCK_THREADS, 2)
merge(const T* __restrict__ x, long long x_stride,
      const typename Accumulator<T>::type* __restrict__ mean,
      const long long* __restrict__ labels,
      const typename Accumulator<T>::type* __restrict__ weights,
      const typename Accumulator<T>::type* __restrict__ fallback,
      const typename Accumulator<T>::type* __restrict__ carried, int n_problems, int n, int m,
      int k, int has_fallback, int with_objective,
      typename Accumulator<T>::type* __restrict__ workspace,
      typename Accumulator<T>::type* __restrict__ tokens,
      typename Accumulator<T>::type* __restrict__ sizes,
      typename Accumulator<T>::type* __restrict__ objective) {
  using Acc = typename Accumulator<T>::type;
  (void)workspace;  // unused: the distances stay in registers (kept for the launch's layout)
  const int problem = blockIdx.x;
  if (problem >= n_problems || n <= 0 || k <= 0) return;  // uniform across the block
  TP_DYNAMIC_SHARED(shared);
  const long long token_offset = static_cast<long long>(problem) * n;
  x += static_cast<long long>(problem) * x_stride;
  mean += static_cast<long long>(problem) * m;
  weights += token_offset;
  fallback += has_fallback ? token_offset : 0;
  carried += token_offset;
  tokens += static_cast<long long>(problem) * k * m;
  sizes += static_cast<long long>(problem) * k;
  const MergeLayout<Acc> layout{n, k, with_objective != 0};
  const int stride = layout.stride();
  const int pooled_at = layout.token_columns();  // first stage column of the pooled tokens
  Acc* const stage = reinterpret_cast<Acc*>(shared);
  unsigned long long* const nearest =
      reinterpret_cast<unsigned long long*>(stage + layout.stage_count());
  Acc* const token_weights = reinterpret_cast<Acc*>(nearest + layout.key_count());
  Acc* const totals = token_weights + n;
  Acc* const scratch = totals + k;
  int* const cluster = reinterpret_cast<int*>(scratch + kWarps);
  int* const order = cluster + n;
  int* const starts = order + n;

  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    const long long label = labels[token_offset + i];
    cluster[i] = label >= 0 && label < k ? static_cast<int>(label) : 0;  // never out of range
    if (with_objective) nearest[i] = kNoKey;
  }
  __syncthreads();
  group_members(cluster, n, k, order, starts);

  // Per cluster: which weights its mean uses, their total, and the output size.
  for (int c = threadIdx.x; c < k; c += kBlockThreads) {
    Acc weight_sum = 0, fallback_sum = 0, size = 0;
    for (int s = starts[c]; s < starts[c + 1]; ++s) {
      const int i = order[s];
      weight_sum += weights[i];
      if (has_fallback) fallback_sum += fallback[i];
      size += carried[i];
    }
    const int source = !has_fallback || weight_sum > 0 ? 0 : fallback_sum > 0 ? 1 : 2;
    Acc total = 0;
    for (int s = starts[c]; s < starts[c + 1]; ++s) {
      const int i = order[s];
      const Acc w = source == 0 ? weights[i] : source == 1 ? fallback[i] : Acc(1);
      token_weights[i] = w;
      total += w;
    }
    totals[c] = total;
    sizes[c] = size;
  }

  // The objective's tiles: kTile pooled tokens x kTile tokens, over all features.
  const int cluster_tiles = (k + kTile - 1) / kTile, token_tiles = (n + kTile - 1) / kTile;
  const int tiles = with_objective ? cluster_tiles * token_tiles : 0;
  const int chunks = (m + kFeatureChunk - 1) / kFeatureChunk;
  int first = 0;
  do {  // rounds of tiles; one without the objective
    int rows[kMergeRoundTiles], columns[kMergeRoundTiles];  // stage columns; -1: none
TP_UNROLL
    for (int j = 0; j < kMergeRoundTiles; ++j) {
      const int t = first + j * kBlockThreads + static_cast<int>(threadIdx.x);
      rows[j] = t < tiles ? pooled_at + t / token_tiles * kTile : -1;
      columns[j] = t < tiles ? t % token_tiles * kTile : -1;
    }
    Acc sum[kMergeRoundTiles][kTile][kTile] = {};
    for (int c = 0; c < chunks; ++c) {
      const int start = c * kFeatureChunk;
      const int width = m - start < kFeatureChunk ? m - start : kFeatureChunk;
      __syncthreads();  // the previous chunk is no longer read (and the weights are written)
      if constexpr (kStagedAsIs<T>) {
        // Asynchronous copies: a thread's copies of the chunk are all in flight at once. A
        // load, then the store that waits for its register (the half types' conversion
        // below), kept one load in flight per thread: with two blocks an SM, 16 warps x 32
        // loads of 4 bytes, about 2 KB an SM, some 0.45 TB/s over 132 SMs at 600 ns of
        // latency, as the H200 measured (77 MB in 0.17 ms: benchmarks/README.md).
        for_8x4(pooled_at, width, [&](int i, int q) {
          if (i < n) {
            copy_async(&stage[q * stride + i], &x[static_cast<long long>(i) * m + start + q]);
          } else {
            stage[q * stride + i] = Acc(0);
          }
        });
        commit_copies();
        wait_copies<0>();
      } else {
        for_8x4(pooled_at, width, [&](int i, int q) {
          stage[q * stride + i] =
              i < n ? to_accumulator(x[static_cast<long long>(i) * m + start + q]) : Acc(0);
        });
      }
      __syncthreads();
      // This chunk of the pooled tokens: to `tokens` (once) and, centred, to the stage.
      for_8x4(stride - pooled_at, width, [&](int pooled, int q) {
        Acc value = 0;
        if (pooled < k) {
          Acc total = 0;
          for (int s = starts[pooled]; s < starts[pooled + 1]; ++s) {
            const int i = order[s];
            total = multiply_add(token_weights[i], stage[q * stride + i], total);
          }
          value = totals[pooled] > 0 ? total / totals[pooled] : mean[start + q];
          if (first == 0) tokens[static_cast<long long>(pooled) * m + start + q] = value;
          value -= mean[start + q];
        }
        stage[q * stride + pooled_at + pooled] = value;
      });
      if (!with_objective) continue;  // uniform
      __syncthreads();  // the pooled tokens no longer read the tokens as they came
      for_8x4(n, width, [&](int i, int q) { stage[q * stride + i] -= mean[start + q]; });
      __syncthreads();
      for (int q = 0; q < width; ++q) {
        const Acc* features = stage + q * stride;
TP_UNROLL
        for (int j = 0; j < kMergeRoundTiles; ++j) {
          if (rows[j] < 0) continue;
          const TileValues<Acc> a = *reinterpret_cast<const TileValues<Acc>*>(features + rows[j]);
          const TileValues<Acc> b =
              *reinterpret_cast<const TileValues<Acc>*>(features + columns[j]);
          add_tile_feature(a, b, sum[j]);
        }
      }
    }
    // Each token's nearest pooled token among this thread's: the least distance (strict,
    // so a NaN is never nearest), then the least over threads by order key.
TP_UNROLL
    for (int j = 0; j < kMergeRoundTiles; ++j) {
      if (rows[j] < 0) continue;
TP_UNROLL
      for (int s = 0; s < kTile; ++s) {
        const int i = columns[j] + s;
        Acc least = infinity<Acc>();
TP_UNROLL
        for (int r = 0; r < kTile; ++r) {
          const Acc d = sum[j][r][s];
          if (rows[j] - pooled_at + r < k && d < least) least = d;
        }
        if (i < n) atomicMin(&nearest[i], order_key(least));
      }
    }
    first += kMergeRoundTiles * kBlockThreads;
  } while (first < tiles);
  if (!with_objective) return;  // uniform across the block
  __syncthreads();
  Acc error = 0;
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    const Acc least = nearest[i] == kNoKey ? infinity<Acc>() : from_order_key<Acc>(nearest[i]);
    error = multiply_add(weights[i], least, error);
  }
  error = block_sum(error, scratch);
  if (threadIdx.x == 0) objective[problem] = error;
}

}  // namespace tokenpool
