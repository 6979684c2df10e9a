// The CUDA kernels of kmedoids.cu compiled for the CPU (through host_emulation.h), with
// C entry points for ctypes. Only the tests use this: it shows that the source the GPU runs
// computes what the generic array-API code computes.
//
//   g++ -std=c++20 -O2 -ffp-contract=off -fvisibility=hidden -shared -fPIC -pthread
//       host_build.cpp -o libtokenpool_cuda_host.so
// (tests/host_cuda.py, HOST_LIBRARY_OPTIONS; hidden symbols: see host_emulation.h)
#include "host_emulation.h"

#include "kmedoids.cu"

namespace {

template <typename T>
long long kmedoids_shared_bytes(int n, int k, int shared_matrix, int tile_rows) {
  const tokenpool::KMedoidsLayout<T> layout{n, k, shared_matrix != 0, tile_rows};
  return layout.bytes();
}

// The instantiation for the matrix's place and fill_matrix's tile rows (1 or 2).
template <typename T>
auto kmedoids_kernel(int shared_matrix, int tile_rows) {
  if (tile_rows == 2) {
    return shared_matrix ? tokenpool::kmedoids<T, true, 2> : tokenpool::kmedoids<T, false, 2>;
  }
  return shared_matrix ? tokenpool::kmedoids<T, true, 1> : tokenpool::kmedoids<T, false, 1>;
}

template <typename T>
void run_kmedoids(const void* x, long long x_stride, const void* mean, const long long* init,
                  const void* weights, int n_problems, int n, int m, int k, int max_iter,
                  int shared_matrix, int tile_rows, void* workspace, long long* labels,
                  long long* medoids, void* history, int* iterations) {
  using Acc = typename tokenpool::Accumulator<T>::type;
  const auto bytes =
      static_cast<std::size_t>(kmedoids_shared_bytes<T>(n, k, shared_matrix, tile_rows));
  const auto kernel = kmedoids_kernel<T>(shared_matrix, tile_rows);
  tp_host::launch(static_cast<unsigned int>(n_problems), tokenpool::kBlockThreads, bytes, [=] {
    kernel(static_cast<const T*>(x), x_stride, static_cast<const Acc*>(mean), init,
           static_cast<const Acc*>(weights), n_problems, n, m, k, max_iter,
           static_cast<Acc*>(workspace), labels, medoids, static_cast<Acc*>(history), iterations);
  });
}

}  // namespace

template <typename T>
void run_merge(const void* x, long long x_stride, const void* mean, const long long* labels,
               const void* weights, const void* fallback, const void* carried, int n_problems,
               int n, int m, int k, int has_fallback, int with_objective, void* workspace,
               void* tokens, void* sizes, void* objective) {
  using Acc = typename tokenpool::Accumulator<T>::type;
  const tokenpool::MergeLayout<Acc> layout{n, k, with_objective != 0};
  const auto bytes = static_cast<std::size_t>(layout.bytes());
  tp_host::launch(static_cast<unsigned int>(n_problems), tokenpool::kBlockThreads, bytes, [=] {
    tokenpool::merge<T>(static_cast<const T*>(x), x_stride, static_cast<const Acc*>(mean), labels,
                        static_cast<const Acc*>(weights), static_cast<const Acc*>(fallback),
                        static_cast<const Acc*>(carried), n_problems, n, m, k, has_fallback,
                        with_objective, static_cast<Acc*>(workspace),
                        static_cast<Acc*>(tokens), static_cast<Acc*>(sizes),
                        static_cast<Acc*>(objective));
  });
}

#define TP_KMEDOIDS_ENTRY(suffix, T)                                                               \
  TP_HOST_EXPORT void tp_kmedoids_##suffix(const void* x, long long x_stride, const void* mean,    \
                                           const long long* init, const void* weights,             \
                                           int n_problems, int n, int m, int k, int max_iter,      \
                                           int shared_matrix, int tile_rows, void* workspace,      \
                                           long long* labels, long long* medoids, void* history,   \
                                           int* iterations) {                                      \
    run_kmedoids<T>(x, x_stride, mean, init, weights, n_problems, n, m, k, max_iter,               \
                    shared_matrix, tile_rows, workspace, labels, medoids, history, iterations);    \
  }                                                                                                \
  TP_HOST_EXPORT long long tp_kmedoids_shared_bytes_##suffix(int n, int k, int shared_matrix,      \
                                                             int tile_rows) {                      \
    return kmedoids_shared_bytes<T>(n, k, shared_matrix, tile_rows);                               \
  }                                                                                                \
  TP_HOST_EXPORT void tp_merge_##suffix(const void* x, long long x_stride, const void* mean,       \
                                        const long long* labels, const void* weights,              \
                                        const void* fallback, const void* carried, int n_problems, \
                                        int n, int m, int k, int has_fallback, int with_objective, \
                                        void* workspace, void* tokens, void* sizes,                \
                                        void* objective) {                                         \
    run_merge<T>(x, x_stride, mean, labels, weights, fallback, carried, n_problems, n, m, k,       \
                 has_fallback, with_objective, workspace, tokens, sizes, objective);               \
  }                                                                                                \
  TP_HOST_EXPORT long long tp_merge_shared_bytes_##suffix(int n, int k, int with_objective) {      \
    using Acc = typename tokenpool::Accumulator<T>::type;                                          \
    return tokenpool::MergeLayout<Acc>{n, k, with_objective != 0}.bytes();                         \
  }

TP_KMEDOIDS_ENTRY(float64, double)
TP_KMEDOIDS_ENTRY(float32, float)
TP_KMEDOIDS_ENTRY(float16, tokenpool::Half)
TP_KMEDOIDS_ENTRY(bfloat16, tokenpool::BFloat16)

TP_HOST_EXPORT int tp_block_threads() { return tokenpool::kBlockThreads; }
TP_HOST_EXPORT int tp_feature_chunk() { return tokenpool::kFeatureChunk; }
