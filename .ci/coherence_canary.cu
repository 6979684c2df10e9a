// A kernel that .ci/ptx_coherence.py must flag (check_cuda.sh fails if it does not): it
// writes `out`, then, after a barrier, loads from `in` or `out` through one selected
// pointer, which nvcc 12-13 compiles to a single ld.global.nc. The merge kernel once read
// its pooled tokens back this way (`j < n ? x[...] : tokens[...]`).
__global__ void coherence_canary(const float* __restrict__ in, float* __restrict__ out,
                                 float* __restrict__ both, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = 2.0f * in[i];
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) both[i] = i < n ? in[i] : out[i - n];
}
