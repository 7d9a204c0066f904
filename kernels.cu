// Multi-scale deformable attention (Deformable-DETR layout) for mmi: forward and backward on CUDA.
//
// Layout: value [B, S, M, D], spatial_shapes [L, 2] int64 (H, W), level_start_index [L] int64,
// sampling_locations [B, Q, M, L, P, 2] as (x, y) in [0, 1], attention_weights [B, Q, M, L, P];
// output [B, Q, M*D]. Inputs are float32, float64, float16 or bfloat16; arithmetic is float32 (float64 for
// float64 inputs). Built on first use by mmi.py through torch.utils.cpp_extension.load.
//
// Work split: a group of G consecutive threads owns one (b, q, m) and VEC channels per thread (16 bytes of
// input, in runs of 4 channels; see load_lane). The group's points are fetched cooperatively (thread j
// reads point j) and handed round with shuffles. The value gradient is scattered with float atomics into a
// float32 buffer (vector atomics on sm_90), most of it first summed per pixel in shared memory by a block that
// serves many queries of one head (see "binned value gradient"); location and weight gradients are summed over
// the group with a butterfly that leaves thread j holding the total of point j, so they are written once,
// coalesced. With fewer groups than the GPU has SMs (decoding: one query), the forward spreads each group's
// points over a block instead.
//
// Also here: gemv, the decoding step's matmuls (a few rows of x times each weight), see "decoding matmuls", and
// decode_attention, its attention over the KV cache (see "a decoding step's attention").
//
// Compile units: MMI_PART picks one part of the module, so that a build compiles the parts in parallel:
// 0 the Python bindings (torch's headers, plain C++, no kernel), 1 the forward kernels, 2 3 4 the backward kernels
// for float32 and float64, float16, bfloat16 inputs, 5 gemv on 16-bit weights and decode_attention, 6 gemv on int8
// and int4 weights; the kernel parts include no torch header (parsing those is most of a single unit's compile time).
// Without MMI_PART the file is the whole module in one unit. The parts meet in the plain interface below.

#ifdef MMI_PART
#define MMI_HOST (MMI_PART == 0)
#define MMI_FORWARD (MMI_PART == 1)
#define MMI_BACKWARD_FLOAT (MMI_PART == 2)
#define MMI_BACKWARD_HALF (MMI_PART == 3)
#define MMI_BACKWARD_BFLOAT16 (MMI_PART == 4)
#define MMI_GEMV16 (MMI_PART == 5)
#define MMI_GEMVQ (MMI_PART == 6)
#else
#define MMI_HOST 1
#define MMI_FORWARD 1
#define MMI_BACKWARD_FLOAT 1
#define MMI_BACKWARD_HALF 1
#define MMI_BACKWARD_BFLOAT16 1
#define MMI_GEMV16 1
#define MMI_GEMVQ 1
#endif
#define MMI_BACKWARD (MMI_BACKWARD_FLOAT || MMI_BACKWARD_HALF || MMI_BACKWARD_BFLOAT16)
#define MMI_GEMV (MMI_GEMV16 || MMI_GEMVQ)

#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <algorithm>
#include <vector>

// ------------------------------------------------------------------------------- the parts' interface

namespace mmi {

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

struct Geometry {
  int S, M, D, Q, L, P;
  int64_t n_groups;  // B * Q * M
};

// One deformable attention call: checked, contiguous inputs and what the launch needs of the device.
struct MsdaLaunch {
  DType dtype;
  const void* value;
  const int64_t* shapes;
  const int64_t* starts;
  const void* loc;
  const void* attn;
  Geometry g;
  int64_t B;
  bool aligned;    // value and the output (forward) or grad_out (backward) start on 16 bytes
  int sms;         // the device's multiprocessors
  int max_shared;  // dynamic shared memory a block may use once the kernel opts in
  cudaStream_t stream;
};

constexpr int kMaxMats = 3;

// One gemv call (x float16 or bfloat16): pointers as in GemvArgs below, R = rows of x. bits 16: the weights are
// x's dtype; bits 8 or 4: quantized, with scales (see GemvArgs).
struct GemvLaunch {
  DType dtype;
  int bits, group_size;
  const void* w[kMaxMats];
  const void* scales[kMaxMats];
  const void* bias[kMaxMats];
  const void* x;
  const void* norm;
  const void* residual;
  void* y;
  int R, N, K, n_mats;
  bool glu;
  float eps;
  cudaStream_t stream;
};

// Each launches its kernel on the call's stream and returns the launch's error.
cudaError_t msda_forward_launch(const MsdaLaunch& in, void* out);
// The backward for float32 and float64, for float16, for bfloat16 inputs (a compile unit each).
cudaError_t msda_backward_launch_float(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                       void* grad_loc, void* grad_attn);
cudaError_t msda_backward_launch_half(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                      void* grad_loc, void* grad_attn);
cudaError_t msda_backward_launch_bfloat16(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                          void* grad_loc, void* grad_attn);
cudaError_t gemv_launch(const GemvLaunch& in);   // bits 16
cudaError_t gemvq_launch(const GemvLaunch& in);  // bits 8 or 4

// One decode_attention call (16-bit tensors, pointers as in DecodeAttentionArgs below).
struct DecodeAttentionLaunch {
  DType dtype;
  const void *q, *k, *v, *cos, *sin, *mask;
  int64_t q_stride, k_stride, v_stride;
  void* kv;
  const int64_t *slot, *pos;
  void* out;
  int B, H, slots, D, positions;  // slots: the cache's length T; positions: the RoPE tables' rows
  cudaStream_t stream;
};
cudaError_t decode_attention_launch(const DecodeAttentionLaunch& in);

}  // namespace mmi

#if MMI_FORWARD || MMI_BACKWARD || MMI_GEMV

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mmi {
namespace {

constexpr int kThreads = 256;  // kernels declare __launch_bounds__(kThreads, 1): without the 1, nvcc 13 capped
                                // the forward at 40 registers and spilled (the timed build had the 1)

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_acc(t[i]);
  } else if constexpr (VEC * sizeof(T) == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_acc(t[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_acc(p[i]);
  }
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) t[i] = from_acc<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else if constexpr (VEC * sizeof(T) == 8) {
    uint2 raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) t[i] = from_acc<T>(v[i]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_acc<T>(v[i]);
  }
}

// Scatter-add of VEC accumulator values; Hopper adds four floats per atomic (scalar atomics measured 4x slower).
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i)
      atomicAdd(reinterpret_cast<float4*>(p) + i, make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]));
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
}

// A lane's VEC channels are VEC/RUN runs of RUN = min(VEC, 4) consecutive channels, run r starting r*RUN*G
// channels after the lane's first: each run of a group is one contiguous stretch of memory, so one warp-wide
// float4 atomic covers whole 32-byte sectors (16-bit inputs with 8 channels a lane would otherwise half-fill
// two sectors per atomic, which measured 1.5x slower).
template <int VEC> constexpr int run_len() { return VEC < 4 ? VEC : 4; }

template <typename T, int VEC, int G, typename A>
__device__ __forceinline__ void load_lane(const T* p, A (&v)[VEC]) {
  constexpr int RUN = run_len<VEC>();
#pragma unroll
  for (int r = 0; r < VEC / RUN; ++r) {
    A sub[RUN];
    load_vec<T, RUN>(p + r * RUN * G, sub);
#pragma unroll
    for (int i = 0; i < RUN; ++i) v[r * RUN + i] = sub[i];
  }
}

template <typename T, int VEC, int G, typename A>
__device__ __forceinline__ void store_lane(T* p, const A (&v)[VEC]) {
  constexpr int RUN = run_len<VEC>();
#pragma unroll
  for (int r = 0; r < VEC / RUN; ++r) {
    A sub[RUN];
#pragma unroll
    for (int i = 0; i < RUN; ++i) sub[i] = v[r * RUN + i];
    store_vec<T, RUN>(p + r * RUN * G, sub);
  }
}

template <int VEC, int G, typename A>
__device__ __forceinline__ void atomic_add_lane(A* p, const A (&v)[VEC]) {
  constexpr int RUN = run_len<VEC>();
#pragma unroll
  for (int r = 0; r < VEC / RUN; ++r) {
    A sub[RUN];
#pragma unroll
    for (int i = 0; i < RUN; ++i) sub[i] = v[r * RUN + i];
    atomic_add_vec<RUN>(p + r * RUN * G, sub);
  }
}

// After the call, lane l of each G-lane group holds Σ_lanes v[l % PB]. The first log2(PB) steps halve the
// array each time (reduce-scatter, PB-1 shuffles); the rest sum over the lanes that share l % PB.
template <int G, int PB, typename A>
__device__ __forceinline__ A reduce_scatter(A (&v)[PB], int lane) {
#pragma unroll
  for (int half = PB / 2; half >= 1; half /= 2) {
    const bool upper = lane & half;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const A send = upper ? v[i] : v[i + half];
      const A keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, half);
    }
  }
  A total = v[0];
#pragma unroll
  for (int off = PB; off < G; off *= 2) total += __shfl_xor_sync(kFullMask, total, off);
  return total;
}

// Level table in shared memory: H, W, first pixel.
__device__ __forceinline__ void load_levels(int* levels, const int64_t* shapes, const int64_t* starts, int L) {
  for (int i = threadIdx.x; i < L; i += blockDim.x) {
    levels[3 * i] = static_cast<int>(shapes[2 * i]);
    levels[3 * i + 1] = static_cast<int>(shapes[2 * i + 1]);
    levels[3 * i + 2] = static_cast<int>(starts[i]);
  }
  __syncthreads();
}

// Bilinear footprint of one sample in pixel units (x, y already scaled and shifted by -0.5).
template <typename A>
struct Footprint {
  int h0, w0;
  A lh, lw, hh, hw;
  bool top, bottom, left, right;
  __device__ __forceinline__ Footprint(A x, A y, int H, int W) {
    const A fy = floor(y), fx = floor(x);
    h0 = static_cast<int>(fy);
    w0 = static_cast<int>(fx);
    lh = y - fy;
    lw = x - fx;
    hh = A(1) - lh;
    hw = A(1) - lw;
    top = h0 >= 0;
    bottom = h0 + 1 < H;
    left = w0 >= 0;
    right = w0 + 1 < W;
  }
};

// The footprint's four corners (top-left, top-right, bottom-left, bottom-right): on the map or not, their element
// offset from the top-left one (pix elements a pixel, W pixels a row), and their bilinear weights.
template <typename A>
struct Corners {
  bool valid[4];
  int64_t offset[4];
  A weight[4];
  __device__ __forceinline__ Corners(const Footprint<A>& f, int64_t pix, int W)
      : valid{f.top && f.left, f.top && f.right, f.bottom && f.left, f.bottom && f.right},
        offset{0, pix, W * pix, W * pix + pix},
        weight{f.hh * f.hw, f.hh * f.lw, f.lh * f.hw, f.lh * f.lw} {}
};

// Point k (= l * P + p) of a group: x, y in pixels of its H x W level, shifted by -0.5 (as the samplers take them),
// and its attention weight a. Zeros for a lane past the last point of a round.
template <typename A>
struct Point {
  A x = A(0), y = A(0), a = A(0);
};

template <typename A, typename T>
__device__ __forceinline__ Point<A> load_point(const T* loc_g, const T* attn_g, int64_t k, int H, int W) {
  return {static_cast<A>(to_acc(loc_g[2 * k]) * W - A(0.5)), static_cast<A>(to_acc(loc_g[2 * k + 1]) * H - A(0.5)),
          static_cast<A>(to_acc(attn_g[k]))};
}

// A sample's weight gradient and its location gradient in pixels (before the factors a·W, a·H) from the four corner
// sums d = Σ_c grad_out·v at tl, tr, bl, br.
template <typename A>
__device__ __forceinline__ void point_gradients(const Footprint<A>& f, const A (&d)[4], A& ga, A& gx, A& gy) {
  ga = f.hh * f.hw * d[0] + f.hh * f.lw * d[1] + f.lh * f.hw * d[2] + f.lh * f.lw * d[3];
  gx = f.hh * (d[1] - d[0]) + f.lh * (d[3] - d[2]);
  gy = f.hw * (d[2] - d[0]) + f.lw * (d[3] - d[1]);
}

// Stores point k's gradients, summed over the group: locations in [0, 1] units (x a·W, y a·H), then the weight.
template <typename T, typename A>
__device__ __forceinline__ void store_point_gradients(T* grad_loc, T* grad_attn, int64_t k, A sx, A sy, A sa,
                                                      const Point<A>& p, int H, int W) {
  grad_loc[2 * k] = from_acc<T>(sx * p.a * A(W));
  grad_loc[2 * k + 1] = from_acc<T>(sy * p.a * A(H));
  grad_attn[k] = from_acc<T>(sa);
}

// The (b, q, m) group a thread serves and its lane in it. Blocks walk the groups head by head, q fastest: the
// queries of one head sample the same value slice [B, S, m, D], which then stays in L2 (measured on an H100, bf16
// forward: 0.78 ms against 0.88 in (b, q, m) order at LLM-MMFS 8 images; float32 0.93 against 1.42). `group` is
// still the (b, q, m) index of the inputs. Threads past the last group mirror it (every lane of a warp must run
// the same trip counts for the shuffles) and are not `active`: they store and scatter nothing.
struct GroupPlace {
  int lane;
  bool active;
  int64_t group, b;
  int m;
};

template <int G>
__device__ __forceinline__ GroupPlace place_group(const Geometry& g) {
  const int64_t raw = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const int64_t head_major = raw < g.n_groups ? raw : g.n_groups - 1;  // (b, m, q)
  const int64_t b = head_major / (static_cast<int64_t>(g.M) * g.Q), q = head_major % g.Q;
  const int m = static_cast<int>(head_major / g.Q % g.M);
  return {static_cast<int>(threadIdx.x % G), raw < g.n_groups, (b * g.Q + q) * g.M + m, b, m};
}

// One sample's bilinear read of VEC channels, weighted by a, added into acc. v_level points at the level's
// first pixel (channel offset included); x, y in pixels, already shifted by -0.5.
template <typename T, int VEC, int G, typename A>
__device__ __forceinline__ void sample_forward(const T* v_level, int64_t pix, A x, A y, A a, int H, int W,
                                               A (&acc)[VEC]) {
  // Nothing to sample once both footprint columns (or rows) are off the map. At x == -1 exactly the right column
  // is pixel 0 with weight 0: grid_sample (the reference) keeps it, and its location gradient is not zero, so the
  // test is >= here where the original op had >.
  if (!(y >= A(-1) && x >= A(-1) && y < A(H) && x < A(W))) return;
  const Footprint<A> f(x, y, H, W);
  const T* corner = v_level + (static_cast<int64_t>(f.h0) * W + f.w0) * pix;
  const Corners<A> c(f, pix, W);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (!c.valid[k]) continue;
    A v[VEC];
    load_lane<T, VEC, G>(corner + c.offset[k], v);
    const A w = c.weight[k] * a;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
  }
}

// One group per (b, q, m) (place_group); channels [c, c+VEC) per thread.
template <typename T, int VEC, int G>
__global__ void __launch_bounds__(kThreads, 1) msda_forward_kernel(const T* __restrict__ value,
                                                                const int64_t* __restrict__ shapes,
                                                                const int64_t* __restrict__ starts,
                                                                const T* __restrict__ loc,
                                                                const T* __restrict__ attn, T* __restrict__ out,
                                                                Geometry g) {
  using A = typename Acc<T>::type;
  constexpr int PB = G < 8 ? G : 8;  // points fetched per round
  extern __shared__ int levels[];
  load_levels(levels, shapes, starts, g.L);

  const auto [lane, active, group, b, m] = place_group<G>(g);
  const int64_t pix = static_cast<int64_t>(g.M) * g.D;  // stride between pixels of one head
  const T* v_head = value + b * g.S * pix + static_cast<int64_t>(m) * g.D;
  const T* loc_g = loc + group * g.L * g.P * 2;
  const T* attn_g = attn + group * g.L * g.P;

  for (int chunk = 0; chunk < g.D; chunk += G * VEC) {
    const int c = chunk + lane * run_len<VEC>();
    const bool c_ok = c < g.D;
    A acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = A(0);

    for (int l = 0; l < g.L; ++l) {
      const int H = levels[3 * l], W = levels[3 * l + 1];
      const T* v_level = v_head + static_cast<int64_t>(levels[3 * l + 2]) * pix + (c_ok ? c : 0);
      for (int p0 = 0; p0 < g.P; p0 += PB) {
        const int pj = p0 + lane % PB;
        const Point<A> mine = pj < g.P ? load_point<A>(loc_g, attn_g, static_cast<int64_t>(l) * g.P + pj, H, W)
                                       : Point<A>{};
#pragma unroll
        for (int j = 0; j < PB; ++j) {
          const A x = __shfl_sync(kFullMask, mine.x, j, G);
          const A y = __shfl_sync(kFullMask, mine.y, j, G);
          const A a = __shfl_sync(kFullMask, mine.a, j, G);
          if (p0 + j < g.P && c_ok) sample_forward<T, VEC, G>(v_level, pix, x, y, a, H, W, acc);
        }
      }
    }
    if (active && c_ok) store_lane<T, VEC, G>(out + group * g.D + c, acc);
  }
}

// Few groups (decoding: one query, B*M groups in all): the kernel above would run one block whose threads each
// walk all L*P points, one dependent load chain after another. Here a block serves one (b, q, m); its kSplit
// slices of G threads take every kSplit-th of the group's points, and their partial sums meet in shared memory.
// Needs D == G * VEC (one channel chunk).
template <typename T, int VEC, int G>
__global__ void __launch_bounds__(kThreads, 1) msda_forward_split_kernel(const T* __restrict__ value,
                                                                      const int64_t* __restrict__ shapes,
                                                                      const int64_t* __restrict__ starts,
                                                                      const T* __restrict__ loc,
                                                                      const T* __restrict__ attn,
                                                                      T* __restrict__ out, Geometry g) {
  using A = typename Acc<T>::type;
  constexpr int kSplit = kThreads / G;
  extern __shared__ int levels[];
  load_levels(levels, shapes, starts, g.L);
  A* partial = reinterpret_cast<A*>(levels + 3 * g.L + 1 - (3 * g.L + 1) % 2);  // [kSplit][D], 8-byte aligned

  const int64_t group = blockIdx.x;
  const int64_t b = group / g.M / g.Q;
  const int m = static_cast<int>(group % g.M);
  const int lane = threadIdx.x % G, slice = threadIdx.x / G;
  const int64_t pix = static_cast<int64_t>(g.M) * g.D;
  const int c = lane * run_len<VEC>();
  const T* v_head = value + b * g.S * pix + static_cast<int64_t>(m) * g.D + c;
  const T* loc_g = loc + group * g.L * g.P * 2;
  const T* attn_g = attn + group * g.L * g.P;

  A acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = A(0);
  for (int k = slice; k < g.L * g.P; k += kSplit) {
    const int l = k / g.P;
    const int H = levels[3 * l], W = levels[3 * l + 1];
    const Point<A> p = load_point<A>(loc_g, attn_g, k, H, W);
    sample_forward<T, VEC, G>(v_head + static_cast<int64_t>(levels[3 * l + 2]) * pix, pix, p.x, p.y, p.a, H, W, acc);
  }
  // the lane's channels, run by run (see run_len), into this slice's row
  constexpr int RUN = run_len<VEC>();
#pragma unroll
  for (int r = 0; r < VEC / RUN; ++r)
#pragma unroll
    for (int i = 0; i < RUN; ++i) partial[slice * g.D + c + r * RUN * G + i] = acc[r * RUN + i];
  __syncthreads();
  for (int ch = threadIdx.x; ch < g.D; ch += kThreads) {
    A total = A(0);
    for (int s = 0; s < kSplit; ++s) total += partial[s * g.D + ch];
    out[group * g.D + ch] = from_acc<T>(total);
  }
}

// One sample's share for VEC channels: scatters a·corner-weight·grad_out into grad_value and adds the four
// corner dot products Σ_c grad_out·v (needed for the weight and location gradients) into d[4].
template <typename T, int VEC, int G, typename A>
__device__ __forceinline__ void sample_backward(const T* corner, A* gcorner, int64_t pix, int W,
                                                const Footprint<A>& f, A a, const A (&go)[VEC], A (&d)[4]) {
  const Corners<A> c(f, pix, W);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (!c.valid[k]) continue;
    A v[VEC];
    load_lane<T, VEC, G>(corner + c.offset[k], v);
    A dot = A(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += go[i] * v[i];
    d[k] += dot;
    // a == 0 (masked images) adds nothing: skip the atomics.
    if (a != A(0)) {
      A gv[VEC];
      const A w = c.weight[k] * a;
#pragma unroll
      for (int i = 0; i < VEC; ++i) gv[i] = w * go[i];
      atomic_add_lane<VEC, G>(gcorner + c.offset[k], gv);
    }
  }
}

template <typename T, int VEC, int G>
__global__ void __launch_bounds__(kThreads, 1) msda_backward_kernel(
    const T* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const T* __restrict__ loc, const T* __restrict__ attn, const T* __restrict__ grad_out,
    typename Acc<T>::type* __restrict__ grad_value, T* __restrict__ grad_loc, T* __restrict__ grad_attn,
    Geometry g) {
  using A = typename Acc<T>::type;
  constexpr int PB = G < 8 ? G : 8;
  extern __shared__ int levels[];
  load_levels(levels, shapes, starts, g.L);

  const auto [lane, active, group, b, m] = place_group<G>(g);
  const int64_t pix = static_cast<int64_t>(g.M) * g.D;
  const int64_t head_offset = b * g.S * pix + static_cast<int64_t>(m) * g.D;
  const T* loc_g = loc + group * g.L * g.P * 2;
  const T* attn_g = attn + group * g.L * g.P;
  const int stride = G * VEC;  // channels covered by one pass of the group
  const int c0 = lane * run_len<VEC>();
  const bool c0_ok = c0 < g.D;

  A go0[VEC];  // grad_out of the first channel chunk stays in registers; wider heads reload the rest
#pragma unroll
  for (int i = 0; i < VEC; ++i) go0[i] = A(0);
  if (c0_ok) load_lane<T, VEC, G>(grad_out + group * g.D + c0, go0);

  for (int l = 0; l < g.L; ++l) {
    const int H = levels[3 * l], W = levels[3 * l + 1];
    const int64_t level_offset = head_offset + static_cast<int64_t>(levels[3 * l + 2]) * pix;
    for (int p0 = 0; p0 < g.P; p0 += PB) {
      const int pj = p0 + lane % PB;
      const Point<A> mine = pj < g.P ? load_point<A>(loc_g, attn_g, static_cast<int64_t>(l) * g.P + pj, H, W)
                                     : Point<A>{};
      A gx[PB], gy[PB], ga[PB];  // this lane's partial sums, per point of the round
#pragma unroll
      for (int j = 0; j < PB; ++j) {
        const A x = __shfl_sync(kFullMask, mine.x, j, G);
        const A y = __shfl_sync(kFullMask, mine.y, j, G);
        const A a = __shfl_sync(kFullMask, mine.a, j, G);
        gx[j] = gy[j] = ga[j] = A(0);
        const bool inside = y >= A(-1) && x >= A(-1) && y < A(H) && x < A(W);  // as in sample_forward
        if (p0 + j < g.P && inside) {
          const Footprint<A> f(x, y, H, W);
          const int64_t corner = level_offset + (static_cast<int64_t>(f.h0) * W + f.w0) * pix;
          A d[4] = {A(0), A(0), A(0), A(0)};  // Σ_c grad_out·v at tl, tr, bl, br
          const A a_scatter = active ? a : A(0);  // idle tail groups must not scatter
          if (c0_ok)
            sample_backward<T, VEC, G>(value + corner + c0, grad_value + corner + c0, pix, W, f, a_scatter, go0, d);
          for (int c = c0 + stride; c < g.D; c += stride) {
            A go[VEC];
            load_lane<T, VEC, G>(grad_out + group * g.D + c, go);
            sample_backward<T, VEC, G>(value + corner + c, grad_value + corner + c, pix, W, f, a_scatter, go, d);
          }
          point_gradients(f, d, ga[j], gx[j], gy[j]);
        }
      }
      const A sx = reduce_scatter<G, PB>(gx, lane);
      const A sy = reduce_scatter<G, PB>(gy, lane);
      const A sa = reduce_scatter<G, PB>(ga, lane);
      if (active && lane < PB && pj < g.P)
        store_point_gradients(grad_loc, grad_attn, group * g.L * g.P + static_cast<int64_t>(l) * g.P + pj, sx, sy, sa,
                              mine, H, W);
    }
  }
}

// Binned value gradient. The kernel above sends every sample's value gradient to global memory with atomics (4
// corners x D channels a sample), and those float32 atomics are most of the backward's time. Here a block serves
// `block_queries` queries of one (b, m) head and, level by level, lists each (query, point, corner) it scatters as
// an entry (pixel, weight); the entries are counting-sorted by pixel in shared memory (integer atomics only) into
// (weight, query) pairs, then each (pixel, 4 channels) sums its pairs' weight x grad_out from a shared copy of the
// block's grad_out and adds the total with one atomic. A level of n pixels thus costs at most n x D/4 atomics a
// block instead of entries x D/4 (an 8x8 map at 128 queries x 8 points: 64x fewer). Sorting the pairs rather than
// entry indices keeps the summing loop's loads independent (on an H100, 3.55 against 4.06 ms forward+backward at
// LLM-MMFS 8 images). Summing into shared memory with float atomics instead gained only 3-9% when tried: many
// queries land on the same few pixels. Levels with fewer than kMinEntriesPerPixel entries a pixel keep the direct
// atomics; the location and weight gradients are computed as above.
constexpr int kBinEntries = 4096;        // (query, point, corner) slots of one block and level
constexpr int kMinEntriesPerPixel = 4;  // a level with fewer of the block's entries per pixel scatters directly
constexpr int kBinPixels = kBinEntries / kMinEntriesPerPixel;

// Queries of a (b, m) head per block, a multiple of the groups per block, 0 where P is too large to bin.
int bin_queries(int P, int G) {
  const int64_t groups = kThreads / G;
  const int64_t per_group = std::min<int64_t>(4, kBinEntries / (4 * static_cast<int64_t>(P) * groups));
  return static_cast<int>(per_group * groups);
}

size_t bin_smem_bytes(int block_queries, int D, int L) {
  return sizeof(float) * block_queries * D                  // grad_out of the block's queries
         + (2 * sizeof(float) + sizeof(int) + sizeof(uint16_t)) * kBinEntries  // weight, pixel; sorted weight, query
         + sizeof(int) * (kBinPixels + kThreads / 32 + 3 * L);              // bins, warp sums, level table
}

// In-place exclusive prefix sum of a[0, n) by the whole block (n <= kBinPixels); ends with a barrier.
__device__ __forceinline__ void block_exclusive_scan(int* a, int n, int* warp_sums) {
  const int per = (n + kThreads - 1) / kThreads;
  const int begin = min(n, static_cast<int>(threadIdx.x) * per), end = min(n, begin + per);
  int own = 0;
  for (int i = begin; i < end; ++i) own += a[i];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = own;  // inclusive scan of the threads' sums within the warp
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int y = __shfl_up_sync(kFullMask, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int y = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += y;
    }
    if (lane < kThreads / 32) warp_sums[lane] = w;
  }
  __syncthreads();
  int run = x - own + (warp > 0 ? warp_sums[warp - 1] : 0);
  for (int i = begin; i < end; ++i) {
    const int count = a[i];
    a[i] = run;
    run += count;
  }
  __syncthreads();
}

// One block: queries [q0, q0 + block_queries) of head (b, m); group `slot` takes queries slot, slot + groups, ...
// Needs D == G * VEC (one channel chunk per group) and block_queries * P * 4 <= kBinEntries.
template <typename T, int VEC, int G>
__global__ void __launch_bounds__(kThreads, 1) msda_backward_binned_kernel(
    const T* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const T* __restrict__ loc, const T* __restrict__ attn, const T* __restrict__ grad_out,
    float* __restrict__ grad_value, T* __restrict__ grad_loc, T* __restrict__ grad_attn, Geometry g,
    int block_queries) {
  using A = float;
  constexpr int kGroups = kThreads / G;
  constexpr int PB = G < 8 ? G : 8;
  constexpr int RUN = run_len<VEC>();
  extern __shared__ float4 binned_smem[];
  float* go_s = reinterpret_cast<float*>(binned_smem);              // [block_queries][D]
  float* weight = go_s + block_queries * g.D;                        // [kBinEntries]
  int* pixel = reinterpret_cast<int*>(weight + kBinEntries);         // [kBinEntries], -1: nothing to scatter
  float* sorted_weight = reinterpret_cast<float*>(pixel + kBinEntries);  // [kBinEntries]: weights sorted by pixel
  int* bins = reinterpret_cast<int*>(sorted_weight + kBinEntries);   // [kBinPixels]: counts, then bin ends
  int* warp_sums = bins + kBinPixels;                                // [kThreads / 32]
  int* levels = warp_sums + kThreads / 32;                           // [3 L]
  uint16_t* query = reinterpret_cast<uint16_t*>(levels + 3 * g.L);   // [kBinEntries]: their queries
  load_levels(levels, shapes, starts, g.L);

  const int64_t q_tiles = (g.Q + block_queries - 1) / block_queries;
  const int64_t bm = blockIdx.x / q_tiles;  // b * M + m
  const int64_t b = bm / g.M;
  const int m = static_cast<int>(bm % g.M);
  const int64_t q0 = (blockIdx.x % q_tiles) * block_queries;
  const int lane = threadIdx.x % G, slot = threadIdx.x / G;
  const int64_t pix = static_cast<int64_t>(g.M) * g.D;
  const int64_t head_offset = b * g.S * pix + static_cast<int64_t>(m) * g.D;
  const int c0 = lane * RUN;

  // The block's grad_out, float, zero past the last query.
  for (int i = threadIdx.x; i < block_queries * g.D / 4; i += kThreads) {
    const int ql = 4 * i / g.D, c = 4 * i % g.D;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (q0 + ql < g.Q) load_vec<T, 4>(grad_out + ((b * g.Q + q0 + ql) * g.M + m) * g.D + c, v);
    reinterpret_cast<float4*>(go_s)[i] = make_float4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();

  for (int l = 0; l < g.L; ++l) {
    const int H = levels[3 * l], W = levels[3 * l + 1];
    // Binning pays where the block's entries crowd the level's pixels (on an H100, UNet-MMFS's 64x64 map with
    // 4096 entries ran slower binned than direct). Block-uniform: the barriers below are safe.
    const bool binned =
        static_cast<int64_t>(H) * W * kMinEntriesPerPixel <= static_cast<int64_t>(block_queries) * g.P * 4;
    const int n_pixels = binned ? H * W : 0;
    const int64_t level_offset = head_offset + static_cast<int64_t>(levels[3 * l + 2]) * pix;
    for (int i = threadIdx.x; i < n_pixels; i += kThreads) bins[i] = 0;
    __syncthreads();

    for (int ql = slot; ql < block_queries; ql += kGroups) {
      // Queries past the last one mirror it (the group's shuffles need every lane) and write nothing.
      const bool active = q0 + ql < g.Q;
      const int64_t group = (b * g.Q + (active ? q0 + ql : g.Q - 1)) * g.M + m;
      const T* loc_g = loc + group * g.L * g.P * 2;
      const T* attn_g = attn + group * g.L * g.P;
      A go[VEC];
#pragma unroll
      for (int r = 0; r < VEC / RUN; ++r)
#pragma unroll
        for (int i = 0; i < RUN; ++i) go[r * RUN + i] = go_s[ql * g.D + c0 + r * RUN * G + i];

      for (int p0 = 0; p0 < g.P; p0 += PB) {
        const int pj = p0 + lane % PB;
        const Point<A> mine = pj < g.P ? load_point<A>(loc_g, attn_g, static_cast<int64_t>(l) * g.P + pj, H, W)
                                       : Point<A>{};
        const bool my_inside = mine.y >= A(-1) && mine.x >= A(-1) && mine.y < A(H) && mine.x < A(W);
        if (binned && lane < PB && pj < g.P) {  // this lane's point: four entries, -1 where nothing scatters
          const int e = (ql * g.P + pj) * 4;
          if (active && my_inside && mine.a != A(0)) {
            const Footprint<A> f(mine.x, mine.y, H, W);
            const Corners<A> c(f, 1, W);
            const int first = f.h0 * W + f.w0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              pixel[e + k] = c.valid[k] ? first + static_cast<int>(c.offset[k]) : -1;
              weight[e + k] = c.weight[k] * mine.a;
              if (c.valid[k]) atomicAdd(bins + first + c.offset[k], 1);
            }
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) pixel[e + k] = -1;
          }
        }
        A gx[PB], gy[PB], ga[PB];
#pragma unroll
        for (int j = 0; j < PB; ++j) {
          const A x = __shfl_sync(kFullMask, mine.x, j, G);
          const A y = __shfl_sync(kFullMask, mine.y, j, G);
          const A a = __shfl_sync(kFullMask, mine.a, j, G);
          gx[j] = gy[j] = ga[j] = A(0);
          const bool inside = y >= A(-1) && x >= A(-1) && y < A(H) && x < A(W);
          if (p0 + j < g.P && inside) {
            const Footprint<A> f(x, y, H, W);
            const int64_t corner = level_offset + (static_cast<int64_t>(f.h0) * W + f.w0) * pix;
            A d[4] = {A(0), A(0), A(0), A(0)};
            const A a_scatter = active && !binned ? a : A(0);  // binned levels scatter below
            sample_backward<T, VEC, G>(value + corner + c0, grad_value + corner + c0, pix, W, f, a_scatter, go, d);
            point_gradients(f, d, ga[j], gx[j], gy[j]);
          }
        }
        const A sx = reduce_scatter<G, PB>(gx, lane);
        const A sy = reduce_scatter<G, PB>(gy, lane);
        const A sa = reduce_scatter<G, PB>(ga, lane);
        if (active && lane < PB && pj < g.P)
          store_point_gradients(grad_loc, grad_attn, group * g.L * g.P + static_cast<int64_t>(l) * g.P + pj, sx, sy,
                                sa, mine, H, W);
      }
    }
    if (!binned) continue;

    __syncthreads();                                   // every entry and count written
    block_exclusive_scan(bins, n_pixels, warp_sums);   // bins[p]: where pixel p's entries start
    const int n_entries = block_queries * g.P * 4;
    for (int e = threadIdx.x; e < n_entries; e += kThreads) {
      const int p = pixel[e];
      if (p < 0) continue;
      const int at = atomicAdd(bins + p, 1);
      sorted_weight[at] = weight[e];
      query[at] = static_cast<uint16_t>(e / (4 * g.P));
    }
    __syncthreads();                                   // bins[p]: where pixel p's entries end
    const int runs = g.D / 4;
    for (int i = threadIdx.x; i < n_pixels * runs; i += kThreads) {
      const int p = i / runs, c = 4 * (i % runs);
      const int begin = p > 0 ? bins[p - 1] : 0, end = bins[p];
      if (begin == end) continue;
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      for (int s = begin; s < end; ++s) {
        const float w = sorted_weight[s];
        const float4 go4 = reinterpret_cast<const float4*>(go_s)[(query[s] * g.D + c) / 4];
        sum[0] += w * go4.x;
        sum[1] += w * go4.y;
        sum[2] += w * go4.z;
        sum[3] += w * go4.w;
      }
      atomic_add_vec<4>(grad_value + level_offset + p * pix + c, sum);
    }
    __syncthreads();                                   // the next level reuses bins, entries and order
  }
}


// ------------------------------------------------------------------------------------- decoding matmuls

// y = x W^T (+ bias) for a few rows of x (R <= 4): a decoding step's matmuls, which read every weight once for one
// token and are bound by memory bandwidth. A block takes kGemvRows rows of W (half of them from each matrix with
// glu; 4 measured faster than 8 or 16 on an H100); each thread walks k 16 bytes at a time, the kGemvRows weight
// loads of an iteration independent and in flight together, then the block sums.
// Several matrices that read the same x (q, k, v) go in one launch, blockIdx.y picking the matrix and the output
// being their concatenation [R, n_mats * N]. glu: two matrices (gate, up) give silu(x Wg^T) * (x Wu^T) [R, N].
// A pre-norm block's RMSNorm and residual add fold in: with a norm weight g, W (g * x) / rms(x) is summed as
// W (g * x) while each block also sums x^2 (it reads all of x anyway), then scaled; a residual is added last.
// So a decoding step needs no separate add + norm kernel between its matmuls.
// Quantized weights (BITS 8 or 4) are read the same way, 16 bytes a load (16 or 32 inputs), and turned into floats
// in registers: y = sum over groups of scale * (sum of q * x), exact products q * scale, never rounded to T.
// int4 in groups of a multiple of 128 inputs goes to tensor cores instead (gemv_int4_mma_kernel below).
constexpr int kGemvThreads = 256;
// int8 rows are half as long: half the threads give each thread as many 16-byte loads a row as bf16's have
template <int BITS> __host__ __device__ constexpr int gemv_threads() { return BITS == 8 ? kGemvThreads / 2 : kGemvThreads; }
constexpr int kGemvRows = 4;

// Byte offset of row n's 16 bytes of int4 inputs k..k+31 (k a multiple of 32) in a matrix of K inputs a row.
__host__ __device__ __forceinline__ int64_t int4_piece(int64_t n, int k, int K) {
  return (n / 16) * 16 * (K / 2) + (k / 32) * 256 + (n % 16) * 16;
}

template <typename T>
struct GemvArgs {
  const void* w[kMaxMats];  // [N, K] of T (BITS 16); int8 [N, K] (BITS 8); int4 (BITS 4) as two a byte (input 2j
                            // in the low nibble, 2j + 1 in the high one, each stored as q + 8) in slabs of 16 rows
                            // (N rounded up to 16), a slab stored as its 32-input pieces (16 bytes of each of its
                            // rows) one after another: row n's inputs k..k+31 at int4_piece(n, k, K)
  const T* scales[kMaxMats];  // quantized: [N, K / group_size], weight[n, k] = q[n, k] * scales[n, k / group_size]
  const T* bias[kMaxMats];  // nullptr: none
  const T* x;
  const T* norm;      // RMSNorm weight [K]: x's rows are normalised first (nullptr: not)
  const T* residual;  // [R, N] added to the output (nullptr: none); one matrix or glu
  T* y;
  int N, K, n_mats;
  int group_size;     // quantized: inputs per scale, a multiple of the inputs a load holds (the whole row for int8)
  float eps;          // the RMSNorm's
};

// x's 8 values at k in each of its R rows, as floats; with NORM, times the norm weight, their squares summed in ss.
template <typename T, int R, bool NORM>
__device__ __forceinline__ void load_x8(const GemvArgs<T>& a, int k, float (&xf)[R][8], float (&ss)[R]) {
  uint4 gv;
  if constexpr (NORM) gv = __ldg(reinterpret_cast<const uint4*>(a.norm + k));
  const T* gt = reinterpret_cast<const T*>(&gv);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(a.x + static_cast<int64_t>(r) * a.K + k));
    const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      xf[r][i] = to_acc(xt[i]);
      if constexpr (NORM) {
        ss[r] += xf[r][i] * xf[r][i];
        xf[r][i] *= to_acc(gt[i]);
      }
    }
  }
}

template <typename T, int R>
__device__ __forceinline__ void dot8(const uint4& w, const float (&x)[R][8], float (&acc)[R]) {
  const T* wt = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r] += to_acc(wt[i]) * x[r][i];
  }
}

// The 8 quantized inputs c * 8 .. c * 8 + 7 of a 16-byte load w, dotted with x's R rows into acc. An int8 or a
// 4-bit value n becomes a float without a conversion instruction: the bits 0x4B000000 | n are the float 2^23 + n.
template <int BITS, int R>
__device__ __forceinline__ void dotq8(const uint4& w, int c, const float (&x)[R][8], float (&acc)[R]) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(&w);
  float q[8];
  if constexpr (BITS == 8) {  // two words of four int8; q + 128 is their bytes with the top bit flipped
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t biased = u[2 * c + h] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        q[4 * h + b] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540 | b)) - 8388736.f;  // 2^23 + 128
    }
  } else {  // one word of eight nibbles, input i at bits 4i, each q + 8
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = __uint_as_float(((u[c] >> (4 * i)) & 0xFu) | 0x4B000000u) - 8388616.f;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r] += q[i] * x[r][i];
  }
}

// Programmatic dependent launch (sm_90 on; launch_pdl below): a gemv may start while the kernel before it in the
// stream is finishing, and load its first weights then. It reads nothing else (x, the residual: that kernel's
// outputs) until pdl_wait() returns, which is once that kernel has finished and its writes are visible; it writes
// nothing before then either. pdl_trigger() lets the kernel after it start the same way.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Sums each v[i] over the block; every thread gets the totals. red: V * THREADS / 32 floats of shared memory.
template <int THREADS, int V>
__device__ __forceinline__ void block_sum(float (&v)[V], float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < V; ++i) {
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) v[i] += __shfl_xor_sync(kFullMask, v[i], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < V; ++i) red[warp * V + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < V; ++i) {
    v[i] = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) v[i] += red[w * V + i];
  }
}

// Offset from a row's first load of the load at input k: row-major, or for int4 32-input pieces 256 bytes apart.
template <int BITS> __device__ __forceinline__ int weight_offset(int k) {
  return BITS == 4 ? k / 32 * 256 : k * BITS / 8;
}

template <typename T, int R, bool GLU, bool NORM, int BITS>
__global__ void __launch_bounds__(gemv_threads<BITS>()) gemv_kernel(GemvArgs<T> a) {
  constexpr int THREADS = gemv_threads<BITS>();
  constexpr int MATS = GLU ? 2 : 1;  // matrices read per block
  constexpr int ROWS = kGemvRows / MATS;
  constexpr int OUTS = MATS * ROWS * R;        // dot products per thread
  constexpr int SUMS = OUTS + (NORM ? R : 0);  // and each row's sum of squares
  constexpr int KI = 128 / BITS;               // inputs a 16-byte weight load holds
  __shared__ float red[THREADS / 32 * SUMS];
  const int mat = GLU ? 0 : blockIdx.y;
  // selects rather than a.w[mat]: a dynamic index into the parameter struct would copy it to local memory
  const void* first = mat == 0 ? a.w[0] : mat == 1 ? a.w[1] : a.w[2];
  const T* first_scales = mat == 0 ? a.scales[0] : mat == 1 ? a.scales[1] : a.scales[2];
  const T* bias = mat == 0 ? a.bias[0] : mat == 1 ? a.bias[1] : a.bias[2];
  const int n0 = blockIdx.x * ROWS;
  const int groups = BITS == 16 ? 0 : a.K / a.group_size;  // scales per row
  const char* w[MATS][ROWS];
  const T* scales[MATS][ROWS];
#pragma unroll
  for (int j = 0; j < MATS; ++j)
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {  // rows past N reread row N-1 and are not written
      const int64_t n = min(n0 + i, a.N - 1);
      w[j][i] = static_cast<const char*>(j == 0 ? first : a.w[1]) + (BITS == 4 ? int4_piece(n, 0, a.K)
                                                                               : n * a.K * BITS / 8);
      scales[j][i] = (j == 0 ? first_scales : a.scales[1]) + n * groups;
    }

  if constexpr (BITS < 16) {       // quantized weights come as dependent launches (launch_gemv)
    pdl_trigger();
    if (threadIdx.x * KI < a.K) {  // the first iteration's weights on their way into L2 before the wait
#pragma unroll
      for (int j = 0; j < MATS; ++j)
#pragma unroll
        for (int i = 0; i < ROWS; ++i) prefetch_l2(w[j][i] + weight_offset<BITS>(threadIdx.x * KI));
    }
    pdl_wait();
  }

  float acc[OUTS] = {}, ss[R] = {};
  for (int k = threadIdx.x * KI; k < a.K; k += THREADS * KI) {
    uint4 wv[MATS][ROWS];
#pragma unroll
    for (int j = 0; j < MATS; ++j)
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
        wv[j][i] = __ldcs(reinterpret_cast<const uint4*>(w[j][i] + weight_offset<BITS>(k)));
    if constexpr (BITS == 16) {
      float xf[R][8];
      load_x8<T, R, NORM>(a, k, xf, ss);
#pragma unroll
      for (int j = 0; j < MATS; ++j)
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
          dot8<T, R>(wv[j][i], xf, reinterpret_cast<float(&)[R]>(acc[(j * ROWS + i) * R]));
    } else {
      float part[OUTS] = {};  // this load's sums of q * x; its KI inputs lie in one scale group
#pragma unroll
      for (int c = 0; c < KI / 8; ++c) {
        float xf[R][8];
        load_x8<T, R, NORM>(a, k + 8 * c, xf, ss);
#pragma unroll
        for (int j = 0; j < MATS; ++j)
#pragma unroll
          for (int i = 0; i < ROWS; ++i)
            dotq8<BITS, R>(wv[j][i], c, xf, reinterpret_cast<float(&)[R]>(part[(j * ROWS + i) * R]));
      }
#pragma unroll
      for (int j = 0; j < MATS; ++j)
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
          const float scale = to_acc(scales[j][i][k / a.group_size]);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[(j * ROWS + i) * R + r] += scale * part[(j * ROWS + i) * R + r];
        }
    }
  }
  float sums[SUMS];  // the dot products, then (NORM) each row's sum of squares
#pragma unroll
  for (int t = 0; t < SUMS; ++t) sums[t] = t < OUTS ? acc[t] : ss[(t - OUTS) % R];
  block_sum<THREADS>(sums, red);

  const int i = threadIdx.x / R, r = threadIdx.x % R;  // thread (i, r) writes row n0 + i of output row r
  if (threadIdx.x >= ROWS * R || n0 + i >= a.N) return;
  // this thread's sums, picked by unrolled selects: indexing sums with (i, r) would move it to local memory
  float dot = 0.f, up = 0.f, sq = 0.f;
#pragma unroll
  for (int t = 0; t < ROWS * R; ++t) {
    if (t == i * R + r) {
      dot = sums[t];
      if constexpr (GLU) up = sums[ROWS * R + t];
      if constexpr (NORM) sq = sums[OUTS + t % R];
    }
  }
  const float scale = NORM ? rsqrtf(sq / a.K + a.eps) : 1.f;  // 1 / rms of row r
  float out = dot * scale;
  if (bias) out += to_acc(bias[n0 + i]);
  if constexpr (GLU) {
    up *= scale;
    if (a.bias[1]) up += to_acc(a.bias[1][n0 + i]);
    out = out / (1.f + __expf(-out)) * up;
  }
  const int64_t width = static_cast<int64_t>(a.N) * (GLU ? 1 : a.n_mats);
  const int64_t at = r * width + static_cast<int64_t>(mat) * a.N + n0 + i;
  if (a.residual) out += to_acc(a.residual[at]);
  a.y[at] = from_acc<T>(out);
}

#if MMI_GEMVQ
// int4 weights whose scale groups hold whole 128-input chunks, on tensor cores (sm_80 on): an int4 weight's share
// of the memory bandwidth leaves time for about one instruction per weight, less than the loop above's float
// conversion and FMA per weight take. Here a warp multiplies 16-row tiles of W by x's rows with mma.sync m16n8k16
// (A = W, B = x with the columns past R zero, float32 sums), after 11 instructions per 8 weights to unpack them.
// A dot product may visit k in any order, as long as W and x visit it in the same one: so the 4 lanes that share a
// row each own 32 consecutive inputs of a 128-input chunk (one 16-byte load a row), and a lane's mma slots take its
// inputs in the order the nibbles come apart. A 32-bit word holds inputs i = 0..7 at bits 4i; (word >> 4i) &
// 0x000F000F puts inputs i and i + 4 in the two 16-bit halves, and OR-ing the exponent bits of 2^7 (bf16) or 2^10
// (fp16) makes them the numbers 2^7 + q + 8 or 2^10 + q + 8, exact, from which one subtraction gives q. A chunk lies
// in one scale group, so its sums are scaled once per row, as in the loop above (q * x exact, scaled in float32).
// A block is 4 or 8 warps (the launcher's choice) over 32 outputs (glu: 16 outputs of gate and of up), warp w of W
// taking chunks w, w + W, ... with the next two in flight; x is staged in shared memory first; the warps' sums meet
// there too. The weight's slabs put a load instruction's 8 rows in whole 128-byte lines.
constexpr int kMmaWarps = 8;  // at most
constexpr int kMmaChunk = 128;

template <typename T> struct Nibble;  // the bits that make a 16-bit float of 2^e + n from a nibble n, and 2^e + 8
template <> struct Nibble<__nv_bfloat16> { static constexpr uint32_t magic = 0x43004300u; };
template <> struct Nibble<__half> { static constexpr uint32_t magic = 0x64006400u; };

template <typename T>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int i) {  // inputs i and i + 4 as q, two T
  uint32_t biased;  // (word >> 4i) & 0x000F000F | magic in one LOP3 (the compiler makes it two)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(biased) : "r"(word >> (4 * i)), "r"(0x000F000Fu), "r"(Nibble<T>::magic));
  const uint32_t offset = Nibble<T>::magic | 0x00080008u;  // 2^e + 8 in both halves
  uint32_t out;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 d = __hsub2(*reinterpret_cast<const __half2*>(&biased), *reinterpret_cast<const __half2*>(&offset));
    out = *reinterpret_cast<const uint32_t*>(&d);
  } else {
    const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                     *reinterpret_cast<const __nv_bfloat162*>(&offset));
    out = *reinterpret_cast<const uint32_t*>(&d);
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// x * g rounded to T would cost up to ~2 units of roundoff on a small glu output, so with a norm each product p
// (exact in float32) goes in as two T, hi + lo = p: bf16 splits exactly (hi = p's top 16 bits, the rest has at most
// 8 significant bits), fp16 to within 2^-22 of p.
template <typename T>
__device__ __forceinline__ void split_pair(float p0, float p1, uint32_t& hi, uint32_t& lo) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(p0, p1);
    const float2 back = __half22float2(h);
    const __half2 l = __floats2half2_rn(p0 - back.x, p1 - back.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  } else {
    const uint32_t u0 = __float_as_uint(p0), u1 = __float_as_uint(p1);
    hi = __byte_perm(u0, u1, 0x7632);
    lo = __byte_perm(__float_as_uint(p0 - __uint_as_float(u0 & 0xFFFF0000u)),
                     __float_as_uint(p1 - __uint_as_float(u1 & 0xFFFF0000u)), 0x7632);
  }
}

// x's B fragments, staged in shared memory by the whole block before the loop: per row of x and 8 inputs j..j+7,
// one 16-byte entry of the pairs (x_j, x_j+4), (x_j+1, x_j+5), (x_j+2, x_j+6), (x_j+3, x_j+7), the order nibble_pair
// unpacks W in. Lane t reads the 4 entries of its 32 inputs of a chunk; entries are stored so that the 4 lanes of a
// row read 4 consecutive ones (no bank conflict). With NORM the entries hold x * g's hi parts, and a second table
// its lo parts; the block sums x^2 per row on the way.
template <typename T, int R, bool NORM>
__device__ __forceinline__ void stage_x(const GemvArgs<T>& a, uint4* xs, float (&ss)[R]) {
  const int entries = a.K / 8;
  for (int idx = threadIdx.x; idx < R * entries; idx += blockDim.x) {
    const int r = idx / entries, j = idx % entries;
    const int chunk = j / 16, lane_t = (j % 16) / 4, m = j % 4;
    const int at = r * entries + chunk * 16 + m * 4 + lane_t;
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(a.x + static_cast<int64_t>(r) * a.K) + j);
    const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv);
    uint4 hi, lo;
    if constexpr (NORM) {
      const uint4 gv = __ldg(reinterpret_cast<const uint4*>(a.norm) + j);
      const T* xt = reinterpret_cast<const T*>(&xv);
      const T* gt = reinterpret_cast<const T*>(&gv);
      float p[8], sq = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float xf = to_acc(xt[i]);
        sq += xf * xf;
        p[i] = xf * to_acc(gt[i]);
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) ss[rr] += rr == r ? sq : 0.f;  // selects: ss stays in registers
      split_pair<T>(p[0], p[4], hi.x, lo.x);
      split_pair<T>(p[1], p[5], hi.y, lo.y);
      split_pair<T>(p[2], p[6], hi.z, lo.z);
      split_pair<T>(p[3], p[7], hi.w, lo.w);
      xs[R * entries + at] = lo;
    } else {
      hi = make_uint4(__byte_perm(xw[0], xw[2], 0x5410), __byte_perm(xw[0], xw[2], 0x7632),
                      __byte_perm(xw[1], xw[3], 0x5410), __byte_perm(xw[1], xw[3], 0x7632));
    }
    xs[at] = hi;
  }
}

template <typename T, int R, bool GLU, bool NORM>
__global__ void __launch_bounds__(kMmaWarps * 32) gemv_int4_mma_kernel(GemvArgs<T> a) {
  constexpr int OUTS = GLU ? 16 : 32;  // outputs per block; tiles 0 and 1 are gate and up (glu) or rows 0-15, 16-31
  extern __shared__ uint4 xs[];        // staged x: R * K / 8 entries (NORM: twice, hi then lo)
  __shared__ float red[kMmaWarps][32][R];
  __shared__ float red_ss[kMmaWarps][R];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, warps = blockDim.x / 32;
  const int mat = GLU ? 0 : blockIdx.y;
  const void* first = mat == 0 ? a.w[0] : mat == 1 ? a.w[1] : a.w[2];
  const T* first_scales = mat == 0 ? a.scales[0] : mat == 1 ? a.scales[1] : a.scales[2];
  const T* bias = mat == 0 ? a.bias[0] : mat == 1 ? a.bias[1] : a.bias[2];
  const int n0 = blockIdx.x * OUTS, groups = a.K / a.group_size, entries = a.K / 8;
  // tile j's rows g and g + 8: lane t's 16 bytes of chunk c at w[j][h] + 1024 c (a tile past the slabs rereads the
  // last one; rows past N are q = 0 or reread and are not written), their scales s[j][h] (rows past N: row N - 1)
  const uint8_t* w[2][2];
  const T* s[2][2];
  const int slabs = (a.N + 15) / 16;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int slab = min((n0 + (GLU ? 0 : 16 * j)) / 16, slabs - 1);
      w[j][h] = static_cast<const uint8_t*>(GLU && j == 1 ? a.w[1] : first) +
                int4_piece(16 * slab + g + 8 * h, 32 * t, a.K);
      const int64_t n = min(n0 + (GLU ? 0 : 16 * j) + g + 8 * h, a.N - 1);
      s[j][h] = (GLU && j == 1 ? a.scales[1] : first_scales) + n * groups;
    }

  // the warp's next two chunks (weights and scales) are in flight while one is summed, the first two while x is
  // staged
  const int chunks = a.K / kMmaChunk;
  uint4 next[2][2], after[2][2];
  T next_s[2][2], after_s[2][2];
  auto load = [&](int c, uint4 (&wv)[2][2], T (&sv)[2][2]) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[j][h] = __ldcs(reinterpret_cast<const uint4*>(w[j][h] + c * (kMmaChunk / 32) * 256));
        sv[j][h] = s[j][h][c * kMmaChunk / a.group_size];
      }
  };
  pdl_trigger();
  if (warp < chunks) load(warp, next, next_s);
  if (warp + warps < chunks) load(warp + warps, after, after_s);
  pdl_wait();

  float ss[R] = {};
  stage_x<T, R, NORM>(a, xs, ss);
  if constexpr (NORM) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int off = 16; off >= 1; off /= 2) ss[r] += __shfl_xor_sync(kFullMask, ss[r], off);
      if (lane == 0) red_ss[warp][r] = ss[r];
    }
  }
  __syncthreads();

  float acc[2][4] = {};
  const uint4* x_hi = xs + g * entries + t;  // this lane's entries: chunk c's word m at c * 16 + 4 * m
  const uint4* x_lo = x_hi + R * entries;
  for (int c = warp; c < chunks; c += warps) {
    uint4 wv[2][2];
    T sv[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[j][h] = next[j][h];
        next[j][h] = after[j][h];
        sv[j][h] = next_s[j][h];
        next_s[j][h] = after_s[j][h];
      }
    if (c + 2 * warps < chunks) load(c + 2 * warps, after, after_s);
    uint4 b[4], bl[4];  // word m's fragments: x, y for its first mma step, z, w for its second
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      b[m] = g < R ? x_hi[c * 16 + 4 * m] : make_uint4(0u, 0u, 0u, 0u);
      if constexpr (NORM) bl[m] = g < R ? x_lo[c * 16 + 4 * m] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float part[4] = {};
      const uint32_t* lo = reinterpret_cast<const uint32_t*>(&wv[j][0]);  // row g
      const uint32_t* hi = reinterpret_cast<const uint32_t*>(&wv[j][1]);  // row g + 8
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const uint32_t f0[4] = {nibble_pair<T>(lo[m], 0), nibble_pair<T>(hi[m], 0), nibble_pair<T>(lo[m], 1),
                                nibble_pair<T>(hi[m], 1)};
        const uint32_t f1[4] = {nibble_pair<T>(lo[m], 2), nibble_pair<T>(hi[m], 2), nibble_pair<T>(lo[m], 3),
                                nibble_pair<T>(hi[m], 3)};
        mma16816<T>(part, f0, b[m].x, b[m].y);
        mma16816<T>(part, f1, b[m].z, b[m].w);
        if constexpr (NORM) {
          mma16816<T>(part, f0, bl[m].x, bl[m].y);
          mma16816<T>(part, f1, bl[m].z, bl[m].w);
        }
      }
      const float s_lo = to_acc(sv[j][0]), s_hi = to_acc(sv[j][1]);
      acc[j][0] += s_lo * part[0];
      acc[j][1] += s_lo * part[1];
      acc[j][2] += s_hi * part[2];
      acc[j][3] += s_hi * part[3];
    }
  }

  // lane (g, t) holds rows g and g + 8 of each tile for x's rows 2t and 2t + 1
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * j + g + 8 * (e / 2), col = 2 * t + e % 2;
      if (col < R) red[warp][row][col] = acc[j][e];
    }
  __syncthreads();

  const int i = threadIdx.x / R, r = threadIdx.x % R;  // thread (i, r) writes output n0 + i of x's row r
  if (i >= OUTS || n0 + i >= a.N) return;
  float dot = 0.f, up = 0.f, sq = 0.f;
  for (int v = 0; v < warps; ++v) {
    dot += red[v][i][r];
    if constexpr (GLU) up += red[v][16 + i][r];
    if constexpr (NORM) sq += red_ss[v][r];
  }
  const float scale = NORM ? rsqrtf(sq / a.K + a.eps) : 1.f;
  float out = dot * scale;
  if (bias) out += to_acc(bias[n0 + i]);
  if constexpr (GLU) {
    up *= scale;
    if (a.bias[1]) up += to_acc(a.bias[1][n0 + i]);
    out = out / (1.f + __expf(-out)) * up;
  }
  const int64_t width = static_cast<int64_t>(a.N) * (GLU ? 1 : a.n_mats);
  const int64_t at = r * width + static_cast<int64_t>(mat) * a.N + n0 + i;
  if (a.residual) out += to_acc(a.residual[at]);
  a.y[at] = from_acc<T>(out);
}
#endif  // MMI_GEMVQ

// ------------------------------------------------------------------------------ a decoding step's attention

#if MMI_GEMV16
// The attention of one new token per row, with what comes before it folded in: RoPE on the token's query and key
// (the tables' rows at the row's position: the tables are made once, not per step or layer), its key and value
// written into the cache at slot `slot`, then its query over the cache's slots 0..slot (the later slots are empty:
// never read), an additive mask over the slots added to the scores. out = softmax(q k^T / sqrt(D) + mask) v, per
// head, in float32, q and the new k rounded to T first (as the cache and the unfused step hold them).
// One block per (head, row); each warp runs an online softmax over every kDecodeWarps-th run of kDecodeKeys slots,
// a lane holding D / 32 channels, and the warps' partial sums meet in shared memory.
constexpr int kDecodeWarps = 16;
constexpr int kDecodeKeys = 4;

template <typename T>
struct DecodeAttentionArgs {
  const T *q, *k, *v;          // [B, H * D] rows, row strides q_stride, k_stride, v_stride (items)
  int64_t q_stride, k_stride, v_stride;
  const T *cos, *sin;          // [positions, D] rotate-half RoPE tables, a row per position
  const int64_t* pos;          // [B] on the device: each row's token position, the tables' row it reads
  const T* mask;               // [B, T] added to the scores (0 or the dtype's minimum), or null
  T* kv;                       // [2, B, H, T, D] the cache
  const int64_t* slot;         // [1] on the device: the slot the token's key and value go to
  T* out;                      // [B, H * D]
  int B, H, slots, D, positions;  // slots: the cache's length T; positions: the tables' rows
};

template <typename T, int E>  // E = D / 32 channels a lane: lane l holds channels l * E .. l * E + E - 1
__device__ __forceinline__ void load_lane_row(const T* row, float (&x)[E]) {
  const int lane = threadIdx.x % 32;
  if constexpr (E == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(row + lane * 4);
    const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = to_acc(h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = to_acc(row[lane * E + e]);
  }
}

// x (B, H, 1, D) rotated: channel c < D/2 pairs with c + D/2, which sits in lane ^ 16; the result rounded to T.
template <typename T, int E>
__device__ __forceinline__ void rope_lane(float (&x)[E], const T* cos, const T* sin) {
  const int lane = threadIdx.x % 32;
  float c[E], s[E];
  load_lane_row<T, E>(cos, c);
  load_lane_row<T, E>(sin, s);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float other = __shfl_xor_sync(kFullMask, x[e], 16);
    x[e] = to_acc(from_acc<T>(x[e] * c[e] + (lane < 16 ? -other : other) * s[e]));
  }
}

template <typename T, int E>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_attention_kernel(DecodeAttentionArgs<T> a) {
  constexpr int D = 32 * E;
  const int h = blockIdx.x, b = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  pdl_wait();
  const int64_t slot = *a.slot, pos = a.pos[b];
  // a slot outside the cache or a position outside the tables is a caller's bug: never a silent write or read
  if (slot < 0 || slot >= a.slots || pos < 0 || pos >= a.positions) __trap();
  T* keys = a.kv + (static_cast<int64_t>(b) * a.H + h) * a.slots * D;              // kv[0, b, h]
  T* values = keys + static_cast<int64_t>(a.B) * a.H * a.slots * D;                // kv[1, b, h]
  float q[E];
  load_lane_row<T, E>(a.q + b * a.q_stride + h * D, q);
  rope_lane<T, E>(q, a.cos + pos * D, a.sin + pos * D);
  if (warp == 0) {
    float k[E], v[E];
    load_lane_row<T, E>(a.k + b * a.k_stride + h * D, k);
    rope_lane<T, E>(k, a.cos + pos * D, a.sin + pos * D);
    load_lane_row<T, E>(a.v + b * a.v_stride + h * D, v);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      keys[slot * D + lane * E + e] = from_acc<T>(k[e]);
      values[slot * D + lane * E + e] = from_acc<T>(v[e]);
    }
  }
  __syncthreads();  // the new slot is written (a block's global writes are visible to the block after a barrier)
  pdl_trigger();
  const float scale = rsqrtf(static_cast<float>(D));
  const T* mask = a.mask ? a.mask + static_cast<int64_t>(b) * a.slots : nullptr;
  float m = -INFINITY, l = 0.f, acc[E] = {};
  for (int64_t t0 = warp * kDecodeKeys; t0 <= slot; t0 += kDecodeWarps * kDecodeKeys) {
    float s[kDecodeKeys], v[kDecodeKeys][E];
#pragma unroll
    for (int u = 0; u < kDecodeKeys; ++u) {
      const int64_t t = t0 + u <= slot ? t0 + u : slot;   // past the slot: read the slot again, weigh it 0 below
      float k[E];
      load_lane_row<T, E>(keys + t * D, k);
      load_lane_row<T, E>(values + t * D, v[u]);
      s[u] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s[u] += q[e] * k[e];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < kDecodeKeys; ++u) s[u] += __shfl_xor_sync(kFullMask, s[u], offset);
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kDecodeKeys; ++u) {
      s[u] = t0 + u <= slot ? s[u] * scale + (mask ? to_acc(mask[t0 + u]) : 0.f) : -INFINITY;
      m_new = fmaxf(m_new, s[u]);
    }
    const float shrink = __expf(m - m_new);   // m_new is finite: slot t0 is in range
    l *= shrink;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= shrink;
#pragma unroll
    for (int u = 0; u < kDecodeKeys; ++u) {
      const float p = __expf(s[u] - m_new);
      l += p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += p * v[u][e];
    }
    m = m_new;
  }
  __shared__ float part_m[kDecodeWarps], part_l[kDecodeWarps], part_acc[kDecodeWarps][D];
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) part_acc[warp][lane * E + e] = acc[e];
  __syncthreads();
  if (threadIdx.x < D) {
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) top = fmaxf(top, part_m[w]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = __expf(part_m[w] - top);   // 0 for a warp that had no slot (m = -inf)
      sum += part_l[w] * f;
      o += part_acc[w][threadIdx.x] * f;
    }
    a.out[static_cast<int64_t>(b) * a.H * D + h * D + threadIdx.x] = from_acc<T>(o / sum);
  }
}

template <typename T>
cudaError_t decode_attention_typed(const DecodeAttentionLaunch& in) {
  const DecodeAttentionArgs<T> args{static_cast<const T*>(in.q), static_cast<const T*>(in.k),
                                    static_cast<const T*>(in.v), in.q_stride, in.k_stride, in.v_stride,
                                    static_cast<const T*>(in.cos), static_cast<const T*>(in.sin), in.pos,
                                    static_cast<const T*>(in.mask), static_cast<T*>(in.kv), in.slot,
                                    static_cast<T*>(in.out), in.B, in.H, in.slots, in.D, in.positions};
  const dim3 grid(in.H, in.B);
  auto kernel = in.D == 128 ? decode_attention_kernel<T, 4> : in.D == 64 ? decode_attention_kernel<T, 2>
                                                                         : decode_attention_kernel<T, 1>;
  return launch_pdl(true, kernel, grid, kDecodeWarps * 32, 0, in.stream, args);
}
#endif  // MMI_GEMV16

// ----------------------------------------------------------------------------------------------- launchers

// Threads per group for the 16-byte path (D = G * vec, or whole warps of passes), 0 where D does not split so.
int group_size(int D, int vec) {
  if (D % vec != 0) return 0;
  const int need = D / vec;
  if (need == 4 || need == 8 || need == 16) return need;
  return need % 32 == 0 ? 32 : 0;
}

// The instantiation for T: 16 bytes per thread and corner (VEC = 16 / sizeof(T)) with G threads a group when D
// and the pointers allow, else 0: one channel per thread over a warp-wide group (correct for any D, slower).
// float64 (gradcheck only) always takes the latter.
template <typename T>
int wide_group(const MsdaLaunch& in) {
  return std::is_same<T, double>::value || !in.aligned ? 0 : group_size(in.g.D, 16 / sizeof(T));
}

// Calls launch(std::integral_constant<int, G>{}) for G in {4, 8, 16, 32}.
template <typename Launch>
cudaError_t with_group(int G, Launch launch) {
  if (G == 4) return launch(std::integral_constant<int, 4>{});
  if (G == 8) return launch(std::integral_constant<int, 8>{});
  if (G == 16) return launch(std::integral_constant<int, 16>{});
  return launch(std::integral_constant<int, 32>{});
}

#if MMI_FORWARD
template <typename T, int VEC, int G>
cudaError_t launch_forward(const MsdaLaunch& in, void* out) {
  const int64_t threads = in.g.n_groups * G;
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  const size_t smem = 3 * sizeof(int) * in.g.L;
  msda_forward_kernel<T, VEC, G><<<blocks, kThreads, smem, in.stream>>>(
      static_cast<const T*>(in.value), in.shapes, in.starts, static_cast<const T*>(in.loc),
      static_cast<const T*>(in.attn), static_cast<T*>(out), in.g);
  return cudaGetLastError();
}

// Groups fewer than one block per SM (decoding) take the split kernel when the head is one channel chunk.
template <typename T, int VEC, int G>
cudaError_t launch_forward_split(const MsdaLaunch& in, void* out) {
  using A = typename Acc<T>::type;
  const size_t smem = (3 * in.g.L + 2) * sizeof(int) + sizeof(A) * (kThreads / G) * in.g.D;
  msda_forward_split_kernel<T, VEC, G><<<static_cast<int>(in.g.n_groups), kThreads, smem, in.stream>>>(
      static_cast<const T*>(in.value), in.shapes, in.starts, static_cast<const T*>(in.loc),
      static_cast<const T*>(in.attn), static_cast<T*>(out), in.g);
  return cudaGetLastError();
}

bool few_groups(const MsdaLaunch& in, int G) { return (in.g.n_groups * G + kThreads - 1) / kThreads < in.sms; }

template <typename T>
cudaError_t forward_typed(const MsdaLaunch& in, void* out) {
  if constexpr (!std::is_same<T, double>::value) {
    constexpr int vec = 16 / sizeof(T);
    if (const int G = wide_group<T>(in)) {
      const bool split = G * vec == in.g.D && few_groups(in, G);
      return with_group(G, [&](auto group_size) {
        constexpr int kG = decltype(group_size)::value;
        return split ? launch_forward_split<T, vec, kG>(in, out) : launch_forward<T, vec, kG>(in, out);
      });
    }
  }
  return launch_forward<T, 1, 32>(in, out);
}
#endif  // MMI_FORWARD

#if MMI_BACKWARD
template <typename T, int VEC, int G>
cudaError_t launch_backward(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc, void* grad_loc,
                            void* grad_attn) {
  using A = typename Acc<T>::type;
  const int64_t threads = in.g.n_groups * G;
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  const size_t smem = 3 * sizeof(int) * in.g.L;
  msda_backward_kernel<T, VEC, G><<<blocks, kThreads, smem, in.stream>>>(
      static_cast<const T*>(in.value), in.shapes, in.starts, static_cast<const T*>(in.loc),
      static_cast<const T*>(in.attn), static_cast<const T*>(grad_out), static_cast<A*>(grad_value_acc),
      static_cast<T*>(grad_loc), static_cast<T*>(grad_attn), in.g);
  return cudaGetLastError();
}

// Queries of one head per block (bin_queries), grid: every (b, m) times its query tiles.
template <typename T, int VEC, int G>
cudaError_t launch_backward_binned(const MsdaLaunch& in, int block_queries, const void* grad_out,
                                   void* grad_value_acc, void* grad_loc, void* grad_attn) {
  const int64_t q_tiles = (in.g.Q + block_queries - 1) / block_queries;
  const int blocks = static_cast<int>(in.B * in.g.M * q_tiles);
  const size_t smem = bin_smem_bytes(block_queries, in.g.D, in.g.L);
  // Above 48 KiB of dynamic shared memory a kernel must opt in (sm_90 allows 227 KiB). Always the device's limit,
  // so that calls from several threads never lower it under one another's launch.
  const cudaError_t err = cudaFuncSetAttribute(msda_backward_binned_kernel<T, VEC, G>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, in.max_shared);
  if (err != cudaSuccess) return err;
  msda_backward_binned_kernel<T, VEC, G><<<blocks, kThreads, smem, in.stream>>>(
      static_cast<const T*>(in.value), in.shapes, in.starts, static_cast<const T*>(in.loc),
      static_cast<const T*>(in.attn), static_cast<const T*>(grad_out), static_cast<float*>(grad_value_acc),
      static_cast<T*>(grad_loc), static_cast<T*>(grad_attn), in.g, block_queries);
  return cudaGetLastError();
}

// The binned backward where it applies: float accumulation, one channel chunk per group, few enough points, and
// its shared memory within the device's limit.
bool can_bin(const MsdaLaunch& in, int G, int vec, int block_queries) {
  return G * vec == in.g.D && block_queries > 0 &&
         bin_smem_bytes(block_queries, in.g.D, in.g.L) <= static_cast<size_t>(in.max_shared);
}

template <typename T>
cudaError_t backward_typed(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc, void* grad_loc,
                           void* grad_attn) {
  if constexpr (!std::is_same<T, double>::value) {
    constexpr int vec = 16 / sizeof(T);
    if (const int G = wide_group<T>(in)) {
      const int block_queries = bin_queries(in.g.P, G);
      const bool binned = can_bin(in, G, vec, block_queries);
      return with_group(G, [&](auto group_size) {
        constexpr int kG = decltype(group_size)::value;
        return binned ? launch_backward_binned<T, vec, kG>(in, block_queries, grad_out, grad_value_acc, grad_loc,
                                                           grad_attn)
                      : launch_backward<T, vec, kG>(in, grad_out, grad_value_acc, grad_loc, grad_attn);
      });
    }
  }
  return launch_backward<T, 1, 32>(in, grad_out, grad_value_acc, grad_loc, grad_attn);
}
#endif  // MMI_BACKWARD

#if MMI_GEMV
// The current device's compute capability major, the shared memory a block may opt in to and its SM count.
struct DeviceLimits { int major = 0, max_shared = 0, sms = 0; };
DeviceLimits device_limits() {
  static DeviceLimits limits[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return {};
  DeviceLimits& d = limits[device];
  if (d.major == 0) {
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&d.max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
  }
  return d;
}

// kernel<<<grid, threads, shared, stream>>>(args...), as a programmatic dependent launch where the device has it
// (sm_90 on): the kernel must call pdl_wait() before it reads what the previous kernel wrote.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(bool pdl, void (*kernel)(Params...), dim3 grid, int threads, int shared,
                       cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl && device_limits().major >= 9 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

#if MMI_GEMVQ
// int4 in groups of whole chunks on tensor cores, where the device has them and x fits in shared memory; else -1.
template <typename T, int R, bool GLU, bool NORM>
int launch_gemv_int4_mma(const GemvArgs<T>& args, cudaStream_t stream) {
  const DeviceLimits d = device_limits();
  static int fixed = -1;  // the kernel's static shared memory; then it may take the rest as dynamic
  if (fixed < 0 && d.major >= 8) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, gemv_int4_mma_kernel<T, R, GLU, NORM>) != cudaSuccess) return -1;
    fixed = static_cast<int>(attr.sharedSizeBytes);
    cudaFuncSetAttribute(gemv_int4_mma_kernel<T, R, GLU, NORM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         d.max_shared - fixed);
  }
  const int bytes = R * args.K * 2 * (NORM ? 2 : 1);  // staged x
  if (args.group_size % kMmaChunk != 0 || d.major < 8 || bytes + fixed > d.max_shared) return -1;
  const dim3 grid((args.N + (GLU ? 15 : 31)) / (GLU ? 16 : 32), GLU ? 1 : args.n_mats);
  // half the warps (each walking twice the chunks) where there are blocks enough to keep every SM busy
  const int warps = grid.x * grid.y >= 3 * d.sms ? kMmaWarps / 2 : kMmaWarps;
  // an error here is read by the caller's cudaGetLastError
  launch_pdl(true, gemv_int4_mma_kernel<T, R, GLU, NORM>, grid, warps * 32, bytes, stream, args);
  return 0;
}
#endif

template <typename T, int R, bool GLU, int BITS>
cudaError_t launch_gemv(const GemvArgs<T>& args, cudaStream_t stream) {
#if MMI_GEMVQ
  if constexpr (BITS == 4) {
    const int done = args.norm ? launch_gemv_int4_mma<T, R, GLU, true>(args, stream)
                               : launch_gemv_int4_mma<T, R, GLU, false>(args, stream);
    if (done == 0) return cudaGetLastError();
  }
#endif
  const int rows = GLU ? kGemvRows / 2 : kGemvRows;
  const dim3 grid((args.N + rows - 1) / rows, GLU ? 1 : args.n_mats);
  // bf16 weights already stream at about the copy rate: only the quantized ones gain by starting early
  constexpr bool pdl = BITS < 16;
  return args.norm ? launch_pdl(pdl, gemv_kernel<T, R, GLU, true, BITS>, grid, gemv_threads<BITS>(), 0, stream, args)
                   : launch_pdl(pdl, gemv_kernel<T, R, GLU, false, BITS>, grid, gemv_threads<BITS>(), 0, stream, args);
}

template <typename T, int BITS>
cudaError_t gemv_typed(const GemvLaunch& in) {
  GemvArgs<T> args{};
  for (int i = 0; i < in.n_mats; ++i) {
    args.w[i] = in.w[i];
    args.scales[i] = static_cast<const T*>(in.scales[i]);
    args.bias[i] = static_cast<const T*>(in.bias[i]);
  }
  args.group_size = in.group_size;
  args.x = static_cast<const T*>(in.x);
  args.norm = static_cast<const T*>(in.norm);
  args.residual = static_cast<const T*>(in.residual);
  args.y = static_cast<T*>(in.y);
  args.eps = in.eps;
  args.N = in.N;
  args.K = in.K;
  args.n_mats = in.n_mats;
  auto launch = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    return in.glu ? launch_gemv<T, R, true, BITS>(args, in.stream) : launch_gemv<T, R, false, BITS>(args, in.stream);
  };
  switch (in.R) {
    case 1: return launch(std::integral_constant<int, 1>{});
    case 2: return launch(std::integral_constant<int, 2>{});
    case 3: return launch(std::integral_constant<int, 3>{});
    default: return launch(std::integral_constant<int, 4>{});
  }
}
#endif  // MMI_GEMV

}  // namespace

#if MMI_FORWARD
cudaError_t msda_forward_launch(const MsdaLaunch& in, void* out) {
  switch (in.dtype) {
    case DType::kFloat: return forward_typed<float>(in, out);
    case DType::kDouble: return forward_typed<double>(in, out);
    case DType::kHalf: return forward_typed<__half>(in, out);
    default: return forward_typed<__nv_bfloat16>(in, out);
  }
}
#endif

#if MMI_BACKWARD_FLOAT
cudaError_t msda_backward_launch_float(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                       void* grad_loc, void* grad_attn) {
  return in.dtype == DType::kDouble ? backward_typed<double>(in, grad_out, grad_value_acc, grad_loc, grad_attn)
                                    : backward_typed<float>(in, grad_out, grad_value_acc, grad_loc, grad_attn);
}
#endif

#if MMI_BACKWARD_HALF
cudaError_t msda_backward_launch_half(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                      void* grad_loc, void* grad_attn) {
  return backward_typed<__half>(in, grad_out, grad_value_acc, grad_loc, grad_attn);
}
#endif

#if MMI_BACKWARD_BFLOAT16
cudaError_t msda_backward_launch_bfloat16(const MsdaLaunch& in, const void* grad_out, void* grad_value_acc,
                                          void* grad_loc, void* grad_attn) {
  return backward_typed<__nv_bfloat16>(in, grad_out, grad_value_acc, grad_loc, grad_attn);
}
#endif

#if MMI_GEMV16
cudaError_t gemv_launch(const GemvLaunch& in) {
  return in.dtype == DType::kHalf ? gemv_typed<__half, 16>(in) : gemv_typed<__nv_bfloat16, 16>(in);
}

cudaError_t decode_attention_launch(const DecodeAttentionLaunch& in) {
  return in.dtype == DType::kHalf ? decode_attention_typed<__half>(in) : decode_attention_typed<__nv_bfloat16>(in);
}
#endif

#if MMI_GEMVQ
cudaError_t gemvq_launch(const GemvLaunch& in) {
  if (in.bits == 8)
    return in.dtype == DType::kHalf ? gemv_typed<__half, 8>(in) : gemv_typed<__nv_bfloat16, 8>(in);
  return in.dtype == DType::kHalf ? gemv_typed<__half, 4>(in) : gemv_typed<__nv_bfloat16, 4>(in);
}
#endif

}  // namespace mmi

#endif  // MMI_FORWARD || MMI_BACKWARD || MMI_GEMV

// ------------------------------------------------------------------------------------------------ host side

#if MMI_HOST

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

namespace mmi {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "mmi kernels: float32, float64, float16 or bfloat16 only, got ", t.scalar_type());
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The checked, contiguous inputs (kept alive here) and the launch description pointing into them.
struct Inputs {
  at::Tensor value, shapes, starts, loc, attn;
  MsdaLaunch launch;
};

Inputs check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "msda: value must be a CUDA tensor");
  TORCH_CHECK(value.dim() == 4, "msda: value must be [B, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "msda: sampling_locations must be [B, Q, M, L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "msda: attention_weights must be [B, Q, M, L, P], got ",
              attention_weights.sizes());
  const int64_t B = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == B && sampling_locations.size(2) == M,
              "msda: sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), "msda: attention_weights ",
              attention_weights.sizes(), " does not match sampling_locations ", sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "msda: spatial_shapes must be [", L, ", 2], got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "msda: level_start_index must be [", L, "], got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "msda: value, sampling_locations and attention_weights must share one dtype");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "msda: all tensors must be on one device");
  TORCH_CHECK(L <= 4096, "msda: at most 4096 levels, got ", L);
  TORCH_CHECK(B * S * M * D < (int64_t(1) << 62) && S < std::numeric_limits<int>::max() &&
                  B * Q * M < std::numeric_limits<int>::max() / 32,
              "msda: tensors too large");
  Inputs in;
  in.value = value.contiguous();
  in.shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  in.starts = level_start_index.to(value.device(), at::kLong).contiguous();
  in.loc = sampling_locations.contiguous();
  in.attn = attention_weights.contiguous();
  MsdaLaunch& l = in.launch;
  l.dtype = dtype_of(value);
  l.value = in.value.data_ptr();
  l.shapes = in.shapes.data_ptr<int64_t>();
  l.starts = in.starts.data_ptr<int64_t>();
  l.loc = in.loc.data_ptr();
  l.attn = in.attn.data_ptr();
  l.g = Geometry{static_cast<int>(S), static_cast<int>(M), static_cast<int>(D), static_cast<int>(Q),
                 static_cast<int>(L), static_cast<int>(P), B * Q * M};
  l.B = B;
  const int device = value.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  l.stream = c10::cuda::getCurrentCUDAStream();
  return in;
}

at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights, bool poison) {
  const c10::cuda::CUDAGuard guard(value.device());
  Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry& g = in.launch.g;
  auto out = at::empty({in.launch.B, g.Q, static_cast<int64_t>(g.M) * g.D}, in.value.options());
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (g.n_groups == 0 || g.D == 0) return out;
  if (g.L == 0 || g.P == 0) return out.zero_();
  in.launch.aligned = aligned16(in.value) && aligned16(out);
  C10_CUDA_CHECK(msda_forward_launch(in.launch, out.data_ptr()));
  return out;
}

// Returns grad_value, grad_sampling_locations, grad_attention_weights.
std::vector<at::Tensor> msda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const at::Tensor& grad_output,
                                      bool poison) {
  const c10::cuda::CUDAGuard guard(value.device());
  Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry& g = in.launch.g;
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == in.launch.B && grad_output.size(1) == g.Q &&
                  grad_output.size(2) == static_cast<int64_t>(g.M) * g.D,
              "msda: grad_output must be [B, Q, M*D], got ", grad_output.sizes());
  const auto grad_out = grad_output.to(in.value.scalar_type()).contiguous();
  const auto dtype = in.value.scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_loc = at::empty_like(in.loc);
  auto grad_attn = at::empty_like(in.attn);
  if (poison) {
    grad_loc.fill_(std::numeric_limits<double>::quiet_NaN());
    grad_attn.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (g.n_groups == 0 || g.L == 0 || g.P == 0 || g.D == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {at::zeros_like(in.value), grad_loc, grad_attn};
  }
  // float32 accumulation for the scattered value gradient (float64 for float64 inputs), cast at the end.
  auto grad_value = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  in.launch.aligned = aligned16(in.value) && aligned16(grad_out);
  const auto launch = dtype == at::kHalf       ? msda_backward_launch_half
                      : dtype == at::kBFloat16 ? msda_backward_launch_bfloat16
                                               : msda_backward_launch_float;
  C10_CUDA_CHECK(launch(in.launch, grad_out.data_ptr(), grad_value.data_ptr(), grad_loc.data_ptr(),
                        grad_attn.data_ptr()));
  return {grad_value.to(dtype), grad_loc, grad_attn};
}

// x [R, K] (R <= 4) and matrices [N, K] of one 16-bit dtype -> [R, n_mats * N], or [R, N] with glu (two matrices).
// norm [K]: x's rows through RMSNorm(weight norm, eps) first; residual [R, N]: added to the one output.
// Quantized matrices (one scales tensor each, of x's dtype): int8 [N, K] with scales [N, 1] (group_size K), or
// uint8 [N rounded up to 16, K / 2] holding two int4 a byte in slabs (GemvArgs::w) with scales [N, K / group_size],
// group_size a multiple of 32.
at::Tensor gemv(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                const std::vector<c10::optional<at::Tensor>>& biases, bool glu,
                const c10::optional<at::Tensor>& norm, double eps, const c10::optional<at::Tensor>& residual,
                const std::vector<at::Tensor>& scales, int64_t group_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_mats = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_mats >= 1 && n_mats <= kMaxMats && (!glu || n_mats == 2),
              "gemv: 1 to ", kMaxMats, " matrices (exactly 2 with glu), got ", n_mats);
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == n_mats, "gemv: one bias (or None) per matrix");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4 && x.is_contiguous() && aligned16(x),
              "gemv: x must be a contiguous, 16-byte aligned CUDA [R <= 4, K] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "gemv: bfloat16 or float16 only");
  const auto wtype = weights[0].scalar_type();
  const int bits = wtype == at::kChar ? 8 : wtype == at::kByte ? 4 : 16;
  const int64_t K = x.size(1), N = bits == 4 && !scales.empty() ? scales[0].size(0) : weights[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == (bits == 16 ? 0 : n_mats),
              "gemv: one scales tensor per quantized matrix, none for ", x.scalar_type(), " ones");
  TORCH_CHECK(K % (128 / bits) == 0, "gemv: K must be a multiple of ", 128 / bits, ", got ", K);
  if (bits == 8) TORCH_CHECK(group_size == K, "gemv: int8 weights have one scale per row (group_size ", K, ")");
  if (bits == 4) TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
                             "gemv: int4 group_size must be a multiple of 32 dividing K = ", K, ", got ", group_size);
  TORCH_CHECK(N >= 1 && N * n_mats < std::numeric_limits<int>::max() && K < std::numeric_limits<int>::max(),
              "gemv: sizes out of range");
  const int64_t rows = bits == 4 ? (N + 15) / 16 * 16 : N, row_items = bits == 4 ? K / 2 : K;
  for (int64_t i = 0; i < n_mats; ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == row_items && w.is_contiguous() && aligned16(w) &&
                    w.scalar_type() == (bits == 16 ? x.scalar_type() : wtype) && w.device() == x.device(),
                "gemv: matrix ", i, " must be a contiguous, aligned [", rows, ", ", row_items, "] of ",
                bits == 16 ? x.scalar_type() : wtype, " on x's device, got ", w.sizes(), " ", w.scalar_type());
    if (bits != 16) {
      const auto& sc = scales[i];
      TORCH_CHECK(sc.dim() == 2 && sc.size(0) == N && sc.size(1) == K / group_size && sc.is_contiguous() &&
                      sc.scalar_type() == x.scalar_type() && sc.device() == x.device(),
                  "gemv: scales ", i, " must be a contiguous [", N, ", ", K / group_size, "] of x's dtype and device");
    }
    if (biases[i].has_value()) {
      const auto& b = *biases[i];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.is_contiguous() && b.scalar_type() == x.scalar_type() &&
                      b.device() == x.device(), "gemv: bias ", i, " must be [", N, "] of x's dtype and device");
    }
  }
  if (norm.has_value()) {
    const auto& g = *norm;
    TORCH_CHECK(g.dim() == 1 && g.size(0) == K && g.is_contiguous() && aligned16(g) &&
                    g.scalar_type() == x.scalar_type() && g.device() == x.device(),
                "gemv: norm must be a contiguous, aligned [", K, "] of x's dtype and device, got ", g.sizes());
  }
  if (residual.has_value()) {
    const auto& res = *residual;
    TORCH_CHECK(glu || n_mats == 1, "gemv: a residual needs one output (one matrix or glu)");
    TORCH_CHECK(res.dim() == 2 && res.size(0) == x.size(0) && res.size(1) == N && res.is_contiguous() &&
                    res.scalar_type() == x.scalar_type() && res.device() == x.device(),
                "gemv: residual must be a contiguous [", x.size(0), ", ", N, "] of x's dtype and device, got ",
                res.sizes());
  }
  auto y = at::empty({x.size(0), glu ? N : n_mats * N}, x.options());
  GemvLaunch launch{};
  launch.dtype = dtype_of(x);
  launch.bits = bits;
  launch.group_size = static_cast<int>(bits == 16 ? 0 : group_size);
  for (int64_t i = 0; i < n_mats; ++i) {
    launch.w[i] = weights[i].data_ptr();
    launch.scales[i] = bits == 16 ? nullptr : scales[i].data_ptr();
    launch.bias[i] = biases[i].has_value() ? biases[i]->data_ptr() : nullptr;
  }
  launch.x = x.data_ptr();
  launch.norm = norm.has_value() ? norm->data_ptr() : nullptr;
  launch.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  launch.y = y.data_ptr();
  launch.R = static_cast<int>(x.size(0));
  launch.N = static_cast<int>(N);
  launch.K = static_cast<int>(K);
  launch.n_mats = static_cast<int>(n_mats);
  launch.glu = glu;
  launch.eps = static_cast<float>(eps);
  launch.stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(bits == 16 ? gemv_launch(launch) : gemvq_launch(launch));
  return y;
}

// q, k, v [B, H * D] (rows may be strided: views into one [B, 3 * H * D] output), cos/sin [P, D] (a row per
// position), pos [B] int64 (each row's position), kv [2, B, H, T, D], slot [1] int64, mask [B, T] or None; all
// 16-bit of one dtype but pos and slot, on one device.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& pos, const at::Tensor& kv, const at::Tensor& slot,
                            const c10::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(kv.is_cuda() && kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous() && aligned16(kv),
              "decode_attention: kv must be a contiguous, aligned CUDA [2, B, H, T, D] tensor, got ", kv.sizes());
  const int64_t B = kv.size(1), H = kv.size(2), T = kv.size(3), D = kv.size(4);
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16 || kv.scalar_type() == at::kHalf,
              "decode_attention: bfloat16 or float16 only");
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "decode_attention: head size 32, 64 or 128, got ", D);
  TORCH_CHECK(B * H * T * D < std::numeric_limits<int64_t>::max() / 4 && B <= 65535 && T < (int64_t(1) << 31),
              "decode_attention: sizes out of range");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == H * D && t->stride(1) == 1 &&
                    t->stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(t->data_ptr()) % 8 == 0 &&
                    t->scalar_type() == kv.scalar_type() && t->device() == kv.device(),
                "decode_attention: q, k and v must be [", B, ", ", H * D, "] rows of kv's dtype and device, 8-byte "
                "aligned with row strides a multiple of 4, got ", t->sizes(), " strides ", t->strides());
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == cos.size(0) && t->size(1) == D && t->is_contiguous() &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 8 == 0 && t->scalar_type() == kv.scalar_type() &&
                    t->device() == kv.device() && cos.size(0) < (int64_t(1) << 31),
                "decode_attention: cos and sin must be contiguous [positions, ", D, "] of kv's dtype, got ",
                t->sizes());
  }
  TORCH_CHECK(pos.numel() == B && pos.is_contiguous() && pos.scalar_type() == at::kLong && pos.device() == kv.device(),
              "decode_attention: pos must be ", B, " contiguous int64 on kv's device, got ", pos.sizes());
  TORCH_CHECK(slot.numel() == 1 && slot.scalar_type() == at::kLong && slot.device() == kv.device(),
              "decode_attention: slot must be one int64 on kv's device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T && mask->is_contiguous() &&
                    mask->scalar_type() == kv.scalar_type() && mask->device() == kv.device(),
                "decode_attention: mask must be a contiguous [", B, ", ", T, "] of kv's dtype, got ", mask->sizes());
  }
  auto out = at::empty({B, H * D}, q.options());
  DecodeAttentionLaunch launch{};
  launch.dtype = dtype_of(kv);
  launch.q = q.data_ptr();
  launch.k = k.data_ptr();
  launch.v = v.data_ptr();
  launch.q_stride = q.stride(0);
  launch.k_stride = k.stride(0);
  launch.v_stride = v.stride(0);
  launch.cos = cos.data_ptr();
  launch.sin = sin.data_ptr();
  launch.mask = mask.has_value() ? mask->data_ptr() : nullptr;
  launch.kv = kv.data_ptr();
  launch.slot = slot.data_ptr<int64_t>();
  launch.pos = pos.data_ptr<int64_t>();
  launch.positions = static_cast<int>(cos.size(0));
  launch.out = out.data_ptr();
  launch.B = static_cast<int>(B);
  launch.H = static_cast<int>(H);
  launch.slots = static_cast<int>(T);
  launch.D = static_cast<int>(D);
  launch.stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(decode_attention_launch(launch));
  return out;
}

}  // namespace
}  // namespace mmi

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &mmi::msda_forward, "multi-scale deformable attention, forward -> [B, Q, M*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("poison") = false);
  m.def("backward", &mmi::msda_backward,
        "multi-scale deformable attention, backward -> (grad_value, grad_sampling_locations, grad_attention_weights)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::arg("poison") = false);
  m.def("gemv", &mmi::gemv,
        "x [R<=4, K] times each weight [N, K] (+ bias) -> [R, n*N]; glu: silu(gate)*up -> [R, N]; "
        "norm: RMSNorm of x first; residual: added to the output; scales, group_size: of int8 or int4 weights",
        py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("glu") = false, py::arg("norm") = py::none(),
        py::arg("eps") = 1e-6, py::arg("residual") = py::none(), py::arg("scales") = std::vector<at::Tensor>{},
        py::arg("group_size") = 0);
  m.def("decode_attention", &mmi::decode_attention,
        "a decoding step's attention: RoPE on q and k at pos, k and v written into kv at slot, q over slots "
        "0..slot -> [B, H*D]", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"),
        py::arg("pos"), py::arg("kv"), py::arg("slot"), py::arg("mask") = py::none());
}

#endif  // MMI_HOST
