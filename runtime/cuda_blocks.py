"""A Gemma3n layer's small blocks as single CUDA kernels, for the compiled decode step on a GPU.

At batch 1 on a big GPU a decode step is host-bound: MLX spends host time on every kernel it
launches (docs/BENCHMARKS.md, "Where a decode step's device time goes"), and about half of a
Gemma3n layer's kernels are norms, AltUp's tiny router and coefficient products and the
element-wise glue between them, each over a few thousand numbers. Here three kernels do what
16 of them do in the generic graph, each in one thread block:

- `tail_predict`: the previous layer's last step (per-layer input norm, AltUp correct, planes
  updated) + this layer's AltUp predict (router norm, router, tanh, prediction coefficients,
  planes mixed) + its input norm. Layer 0 has no previous layer (`predict`).
- `attn_laurel`: post-attention norm, LAuReL's norm and sum, the residual, the `1/sqrt(2)` and
  the pre-feed-forward norm, after o_proj and LAuReL's right projection.
- `correct`: post-feed-forward norm and residual, AltUp's correction router and coefficients,
  the active plane corrected (and scaled), which the per-layer input gate reads.

and in each activation-sparse layer (Gemma3n's first 10) a fourth, `sparse_activate`: the
gate's Gaussian top-k and gelu(gate) * up (`MLP.activate`), where the generic graph has 5.
`heads` norms, scales and rotates a layer's q/k/v heads, where the generic graph has 2;
`attention` is one query token's attention over a layer's K/V buffer (scores with the mask,
softmax, values: runtime/fast.py `attention`), where the generic graph has 3; it takes buffers
of at most ATTENTION_SLOTS slots, one block per head.

The projections between them (q/k/v, o_proj, gate/up, down, the per-layer gate and projection,
LAuReL's two) stay MLX's matmuls, float or quantized. The arithmetic is the generic graph's,
rounded where it rounds (each op's result to the activation dtype, as MLX's fused CUDA kernels
and `mx.fast.rms_norm` do), so the step's numbers stay within a few roundings of it: the
generic graph (runtime/model.py `DecoderLayer.forward`) stays the tested path on every backend,
and tests/test_cuda_blocks.py checks each kernel against it on a CUDA GPU (skipped elsewhere).

Used only where the default device is a CUDA GPU; `MLXP_CUDA_BLOCKS=0` turns them off (the
generic graph then runs on CUDA too: A/B measurements, or a driver where they misbehave).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from runtime.inputs import BadValue
from runtime.projections import row_major_weight

ENV = "MLXP_CUDA_BLOCKS"
THREADS = 256  # one block of this many threads per kernel; every loop strides by it

_HEADER = r"""
// Sum K floats over the block (THREADS threads); every thread gets the sums. `scratch` holds
// 32 * K floats of shared memory.
template <int K, int THREADS>
__device__ inline void block_sum(float (&v)[K], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int WARPS = THREADS / 32;
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffff, v[k], o);
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    #pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  }
  __syncthreads();
  #pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) s += scratch[w * K + k];
    v[k] = s;
  }
}

// This thread's elements t, t + THREADS, ... of a length-W vector as floats (0 past its end).
template <int E, int THREADS, int W, typename In>
__device__ inline void load(float (&dst)[E], const In* src) {
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = threadIdx.x + e * THREADS;
    dst[e] = i < W ? static_cast<float>(src[i]) : 0.f;
  }
}
"""

# Every kernel: T the activations' dtype (its outputs' too), H the hidden width, N the AltUp
# planes, A the active plane; EPS the norms' epsilon. R(x) rounds a float to T and back: where
# the generic graph holds a value in T, so does this code.
#
# Each kernel first loads everything it reads (activations and weights) into registers, then
# computes. A kernel is a chain of passes joined by block sums, and a load cannot move across a
# block sum (nor above a store to an output that might alias it): loaded pass by pass, each pass
# waited on memory once more, about 1 us from DRAM, where the weights are at every step (the
# step streams gigabytes through a 50 MB L2). Loaded first, the loads all overlap. Thread t
# holds elements t, t + THREADS, ... in every pass, so the sums add in the same order as before.
_PRELUDE = r"""
  constexpr int E = (H + THREADS - 1) / THREADS;  // elements per thread
  __shared__ float scratch[32 * (N + 2)];
  const int t = threadIdx.x;
  auto R = [](float x) { return static_cast<float>(static_cast<T>(x)); };
  // mx.fast.rms_norm: w * T(x * rsqrt(mean(x^2) + eps)), the product in T
  auto norm = [&](float x, float r, float w) { return R(w * R(x * r)); };
"""

# AltUp predict's weights (router norm and router, prediction coefficients, input norm).
_PREDICT_LOADS = r"""
  float w_router_norm[E], w_input_norm[E], w_router[N][E], w_coefs[N];
  load<E, THREADS, H>(w_router_norm, router_norm);
  load<E, THREADS, H>(w_input_norm, input_norm);
  #pragma unroll
  for (int j = 0; j < N; ++j) {
    load<E, THREADS, H>(w_router[j], router + j * H);
    w_coefs[j] = t < N * N ? static_cast<float>(prediction_coefs[t * N + j]) : 0.f;
  }
"""

# planes p[N][E] (floats holding T values) -> predictions written to `pred`, the active one's
# input norm to `normed`.
_PREDICT = r"""
  {
    // AltUp's router on the active plane: tanh(router(norm(x)) / H), in T
    float sq[1] = {0.f};
    #pragma unroll
    for (int e = 0; e < E; ++e) sq[0] += p[A][e] * p[A][e];
    block_sum<1, THREADS>(sq, scratch);
    const float r = rsqrtf(sq[0] / H + EPS);
    float dot[N];
    #pragma unroll
    for (int j = 0; j < N; ++j) dot[j] = 0.f;
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      if (i < H) {
        const float x = norm(p[A][e], r, w_router_norm[e]);
        #pragma unroll
        for (int j = 0; j < N; ++j) dot[j] += x * w_router[j][e];
      }
    }
    block_sum<N, THREADS>(dot, scratch);
    __shared__ float coef[N * N];
    if (t < N * N) {  // prediction coefficients: coefs[t] = sum_j W[t, j] * m[j]
      float c = 0.f;
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        const float m = R(tanhf(R(dot[j]) * (1.0f / H)));
        c += w_coefs[j] * m;
      }
      coef[t] = R(c);
    }
    __syncthreads();
    // predictions: plane j + sum_k coefs[j, k] * plane k, one rounding (MLX's addmm)
    float sq_in[1] = {0.f};
    float act[E];
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      act[e] = 0.f;
      if (i < H) {
        #pragma unroll
        for (int j = 0; j < N; ++j) {
          float y = p[j][e];
          #pragma unroll
          for (int k = 0; k < N; ++k) y += coef[j * N + k] * p[k][e];
          pred[j * H + i] = static_cast<T>(y);
          if (j == A) act[e] = R(y);
        }
      }
      sq_in[0] += act[e] * act[e];
    }
    block_sum<1, THREADS>(sq_in, scratch);
    const float r_in = rsqrtf(sq_in[0] / H + EPS);
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      if (i < H) normed[i] = static_cast<T>(norm(act[e], r_in, w_input_norm[e]));
    }
  }
"""

_PLANES_IN = r"""
  float p[N][E];
  #pragma unroll
  for (int j = 0; j < N; ++j) {
    load<E, THREADS, H>(p[j], planes + j * H);
  }
"""

# The previous layer's end: planes = pred - (active - activated) * (coefs + 1) + norm(proj) on
# every plane but the first (DecoderLayer.corrected, as transformers adds it to planes 1:), op by
# op in T.
_TAIL = r"""
  float p[N][E];
  {
    float y[E], w_per_layer_norm[E], activ[E], c1[N];
    load<E, THREADS, H>(y, projected);
    load<E, THREADS, H>(w_per_layer_norm, per_layer_norm);
    load<E, THREADS, H>(activ, activated);
    #pragma unroll
    for (int j = 0; j < N; ++j) {
      load<E, THREADS, H>(p[j], prev_pred + j * H);
      c1[j] = R(static_cast<float>(correction[j]) + 1.0f);
    }
    float sq[1] = {0.f};
    #pragma unroll
    for (int e = 0; e < E; ++e) sq[0] += y[e] * y[e];
    block_sum<1, THREADS>(sq, scratch);
    const float r = rsqrtf(sq[0] / H + EPS);
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      if (i < H) {
        const float first = norm(y[e], r, w_per_layer_norm[e]);
        const float d = R(p[A][e] - activ[e]);
        #pragma unroll
        for (int j = 0; j < N; ++j) {
          const float x = R(p[j][e] - R(d * c1[j]));
          p[j][e] = j == 0 ? x : R(x + first);
        }
      } else {
        #pragma unroll
        for (int j = 0; j < N; ++j) p[j][e] = 0.f;
      }
    }
  }
"""

_ATTN_LAUREL = r"""
  float o[E], l[E], pa[E], nd[E], w_post_attention_norm[E], w_post_laurel_norm[E], w_pre_feedforward_norm[E];
  load<E, THREADS, H>(o, attn);
  load<E, THREADS, H>(l, laurel);
  load<E, THREADS, H>(pa, pred + A * H);
  load<E, THREADS, H>(nd, normed);
  load<E, THREADS, H>(w_post_attention_norm, post_attention_norm);
  load<E, THREADS, H>(w_post_laurel_norm, post_laurel_norm);
  load<E, THREADS, H>(w_pre_feedforward_norm, pre_feedforward_norm);
  float sq[2] = {0.f, 0.f};
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    sq[0] += o[e] * o[e];
    sq[1] += l[e] * l[e];
  }
  block_sum<2, THREADS>(sq, scratch);
  const float r_o = rsqrtf(sq[0] / H + EPS), r_l = rsqrtf(sq[1] / H + EPS);
  const float half = R(0.70710678118654752f);  // 2 ** -0.5 as T: a Python scalar times a T array
  float sq_out[1] = {0.f};
  float s[E];
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = t + e * THREADS;
    s[e] = 0.f;
    if (i < H) {
      const float a = norm(o[e], r_o, w_post_attention_norm[e]);
      const float lr = R(nd[e] + norm(l[e], r_l, w_post_laurel_norm[e]));
      s[e] = R(R(R(pa[e] + a) + lr) * half);
      attn_laurel[i] = static_cast<T>(s[e]);
    }
    sq_out[0] += s[e] * s[e];
  }
  block_sum<1, THREADS>(sq_out, scratch);
  const float r = rsqrtf(sq_out[0] / H + EPS);
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = t + e * THREADS;
    if (i < H) ffw_input[i] = static_cast<T>(norm(s[e], r, w_pre_feedforward_norm[e]));
  }
"""

_CORRECT = r"""
  float act[E];
  {
    float m[E], al[E], pa[E], w_post_feedforward_norm[E], w_router_norm[E], w_router[N][E], w_scale[E], w_coefs[N];
    load<E, THREADS, H>(m, mlp);
    load<E, THREADS, H>(al, attn_laurel);
    load<E, THREADS, H>(pa, pred + A * H);
    load<E, THREADS, H>(w_post_feedforward_norm, post_feedforward_norm);
    load<E, THREADS, H>(w_router_norm, router_norm);
    if (SCALED) {
      load<E, THREADS, H>(w_scale, correct_scale);
    }
    #pragma unroll
    for (int j = 0; j < N; ++j) {
      load<E, THREADS, H>(w_router[j], router + j * H);
      w_coefs[j] = t < N ? static_cast<float>(correction_coefs[t * N + j]) : 0.f;
    }
    float sq[1] = {0.f};
    #pragma unroll
    for (int e = 0; e < E; ++e) sq[0] += m[e] * m[e];
    block_sum<1, THREADS>(sq, scratch);
    const float r = rsqrtf(sq[0] / H + EPS);
    float sq_act[1] = {0.f};
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      act[e] = 0.f;
      if (i < H) {
        act[e] = R(al[e] + norm(m[e], r, w_post_feedforward_norm[e]));
        activated[i] = static_cast<T>(act[e]);
      }
      sq_act[0] += act[e] * act[e];
    }
    block_sum<1, THREADS>(sq_act, scratch);
    const float r_act = rsqrtf(sq_act[0] / H + EPS);
    float dot[N];
    #pragma unroll
    for (int j = 0; j < N; ++j) dot[j] = 0.f;
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      if (i < H) {
        const float x = norm(act[e], r_act, w_router_norm[e]);
        #pragma unroll
        for (int j = 0; j < N; ++j) dot[j] += x * w_router[j][e];
      }
    }
    block_sum<N, THREADS>(dot, scratch);
    __shared__ float coef[N];
    if (t < N) {  // correction coefficients: coefs[t] = sum_j W[t, j] * m[j]
      float c = 0.f;
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        const float mj = R(tanhf(R(dot[j]) * (1.0f / H)));
        c += w_coefs[j] * mj;
      }
      coef[t] = R(c);
      correction[t] = static_cast<T>(c);
    }
    __syncthreads();
    // the active plane corrected: active + (activated - active) * (coefs[A] + 1) (then scaled)
    const float c1 = R(coef[A] + 1.0f);
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = t + e * THREADS;
      if (i < H) {
        float f = R(pa[e] + R(R(act[e] - pa[e]) * c1));
        if (SCALED) f = R(f * w_scale[e]);
        first[i] = static_cast<T>(f);
      }
    }
  }
"""

# An activation-sparse layer's MLP activation (runtime/model.py `MLP.activate`): the Gaussian
# top-k of the gate (mean, deviations, their standard deviation, the threshold), then
# gelu_tanh(gate) * up, op by op in T. W is the layer's intermediate width, M its std multiplier
# (read as T, as the generic graph's Python scalar is). The generic graph spends 5 kernels here,
# one of them a single-row GEMV over the whole width (17 us on E4B); this is one.
_SPARSE_ACTIVATE = r"""
  constexpr int E = (W + THREADS - 1) / THREADS;
  __shared__ float scratch[32];
  const int t = threadIdx.x;
  auto R = [](float x) { return static_cast<float>(static_cast<T>(x)); };
  float g[E], u[E];
  load<E, THREADS, W>(g, gate);
  load<E, THREADS, W>(u, up);
  const float m = R(static_cast<float>(multiplier[0]));
  const float inv_n = R(1.0f / W);
  float s[1] = {0.f};
  #pragma unroll
  for (int e = 0; e < E; ++e) s[0] += g[e];
  block_sum<1, THREADS>(s, scratch);
  const float mean = R(R(s[0]) * inv_n);
  float v[1] = {0.f};
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    if (t + e * THREADS < W) {
      g[e] = R(g[e] - mean);
      v[0] += g[e] * g[e];
    }
  }
  block_sum<1, THREADS>(v, scratch);
  const float threshold = R(R(sqrtf(R(R(v[0]) * inv_n))) * m);
  const float c0 = R(0.044715f), c1 = R(0.7978845608028654f);  // gelu_tanh's constants: sqrt(2 / pi)
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = t + e * THREADS;
    if (i < W) {
      const float x = fmaxf(R(g[e] - threshold), 0.f);
      const float inner = R(c1 * R(x + R(c0 * R(powf(x, 3.0f)))));
      const float gelu = R(R(1.0f + R(tanhf(inner))) * R(0.5f * x));
      out[i] = static_cast<T>(gelu * u[e]);
    }
  }
"""
# One query token's attention over a layer's K/V buffer (runtime/fast.py `attention`): the
# scores (q . k plus the additive mask, rounded to T as the generic graph's addmm rounds them),
# their softmax in float32 (rounded to T), and the probabilities times the values (summed in
# float32, rounded once). One block per q head (G q heads share a K/V head), the scores in shared
# memory: one kernel where the generic graph launches 3 (addmm, softmax, matmul). D is the head
# width, SLOTS the most slots it takes. Both passes give each warp every WARPS-th slot, its lanes
# across the head (a key or value row is one coalesced read), four slots at a time so that their
# reads overlap; the values' per-warp sums meet in shared memory, added in warp order.
_ATTENTION = r"""
  constexpr int WARPS = THREADS / 32, EQ = (D + 31) / 32;  // a lane's elements of a head
  __shared__ float p[SLOTS];
  __shared__ float partial[WARPS * D];
  __shared__ float scratch[32];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, h = blockIdx.x, g = h / G;
  const int S = kv_shape[2], NKV = kv_shape[1] / 2;
  const float neg_inf = -__int_as_float(0x7f800000);
  auto R = [](float x) { return static_cast<float>(static_cast<T>(x)); };
  float qv[EQ];
  #pragma unroll
  for (int e = 0; e < EQ; ++e) {
    const int i = lane + 32 * e;
    qv[e] = i < D ? static_cast<float>(q[h * D + i]) : 0.f;
  }
  const T* keys = kv + static_cast<size_t>(g) * S * D;
  const T* values = kv + static_cast<size_t>(NKV + g) * S * D;
  float m = neg_inf;
  #pragma unroll 4
  for (int j = warp; j < S; j += WARPS) {
    const T* row = keys + static_cast<size_t>(j) * D;
    float s = 0.f;
    #pragma unroll
    for (int e = 0; e < EQ; ++e) {
      const int i = lane + 32 * e;
      if (i < D) s += qv[e] * static_cast<float>(row[i]);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    s = R(s + static_cast<float>(mask[j]));
    if (lane == 0) p[j] = s;
    m = fmaxf(m, s);
  }
  // the largest score over the block (a warp's lanes all hold its own)
  __syncthreads();
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  m = neg_inf;
  #pragma unroll
  for (int w = 0; w < WARPS; ++w) m = fmaxf(m, scratch[w]);
  float sum[1] = {0.f};
  for (int j = t; j < S; j += THREADS) {
    const float e = expf(p[j] - m);
    p[j] = e;
    sum[0] += e;
  }
  block_sum<1, THREADS>(sum, scratch);  // its first barrier also orders p's writes
  const float inv = 1.f / sum[0];
  for (int j = t; j < S; j += THREADS) p[j] = R(p[j] * inv);
  __syncthreads();
  float acc[EQ];
  #pragma unroll
  for (int e = 0; e < EQ; ++e) acc[e] = 0.f;
  #pragma unroll 4
  for (int j = warp; j < S; j += WARPS) {
    const T* row = values + static_cast<size_t>(j) * D;
    const float pj = p[j];
    #pragma unroll
    for (int e = 0; e < EQ; ++e) {
      const int i = lane + 32 * e;
      if (i < D) acc[e] += pj * static_cast<float>(row[i]);
    }
  }
  #pragma unroll
  for (int e = 0; e < EQ; ++e) {
    const int i = lane + 32 * e;
    if (i < D) partial[warp * D + i] = acc[e];
  }
  __syncthreads();
  for (int i = t; i < D; i += THREADS) {
    float o = 0.f;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) o += partial[w * D + i];
    out[h * D + i] = static_cast<T>(o);
  }
"""
# A layer's q, k and v heads (q alone in a KV-shared layer) normed without scale, then scaled
# per head and q and k rotated by RoPE at `position` (runtime/fast.py `heads`): the norm as
# mx.fast.rms_norm rounds it, the two products in T, angles and the sum in float32, rounded
# once. One block per head; the normed head in shared memory, where a thread finds the element
# its rotated half pairs it with. One kernel where the generic graph launches 2.
_HEADS = r"""
  constexpr int E = (D + THREADS - 1) / THREADS, HALF = D / 2;
  __shared__ float xs[D];
  __shared__ float scratch[32];
  const int t = threadIdx.x, h = blockIdx.x;
  auto R = [](float x) { return static_cast<float>(static_cast<T>(x)); };
  float v[E];
  load<E, THREADS, D>(v, x + h * D);
  float sq[1] = {0.f};
  #pragma unroll
  for (int e = 0; e < E; ++e) sq[0] += v[e] * v[e];
  block_sum<1, THREADS>(sq, scratch);
  const float r = rsqrtf(sq[0] / D + EPS);
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = t + e * THREADS;
    if (i < D) xs[i] = R(v[e] * r);
  }
  __syncthreads();
  const float pos = static_cast<float>(position[0]);
  #pragma unroll
  for (int e = 0; e < E; ++e) {
    const int i = t + e * THREADS;
    if (i < D) {
      const int k = h * D + i, other = i < HALF ? i + HALF : i - HALF;
      const float a = pos * static_cast<float>(freq[k]);
      const float y = R(xs[i] * static_cast<float>(scale[k])) * cosf(a) +
                      R(xs[other] * static_cast<float>(swapped[k])) * sinf(a);
      out[k] = static_cast<T>(y);
    }
  }
"""

ATTENTION_SLOTS = 1024  # the longest K/V buffer the kernel takes (one block per head reads it all)
ATTENTION_THREADS = 512
ATTENTION_WIDTH = 256  # the widest head it takes: its per-warp sums fill 16 KB of shared memory

SPARSE_THREADS = 512  # a block of 512 may use 128 registers a thread
SPARSE_WIDTH = 32 * SPARSE_THREADS  # the widest gate it takes: 80 registers at E4B's 16384 (sm_90)

PREDICT_IN = ["planes", "router_norm", "router", "prediction_coefs", "input_norm"]
TAIL_PREDICT_IN = ["prev_pred", "activated", "correction", "projected", "per_layer_norm",
                   "router_norm", "router", "prediction_coefs", "input_norm"]
ATTN_LAUREL_IN = ["attn", "laurel", "pred", "normed", "post_attention_norm", "post_laurel_norm",
                  "pre_feedforward_norm"]
CORRECT_IN = ["mlp", "attn_laurel", "pred", "post_feedforward_norm", "router_norm", "router", "correction_coefs",
              "correct_scale"]


def sparse_kernel_layers(config) -> set[int]:
    """The layers whose MLP activation `Blocks` runs as its kernel: the activation-sparse ones
    whose gate is at most SPARSE_WIDTH wide (a dense layer's gelu * up is one kernel already)."""
    return {i for i, (sparsity, width) in enumerate(zip(config.activation_sparsity_pattern, config.intermediate_size,
                                                        strict=True))
            if sparsity > 0 and width <= SPARSE_WIDTH}


def attends(slots: int, head_dim: int) -> bool:
    """Whether `attention` takes a K/V buffer of `slots` slots of heads `head_dim` wide (else the
    generic graph runs it: one block per head reads the whole buffer, which would be slow on a
    long one, and keeps a head's sums per warp in shared memory)."""
    return slots <= ATTENTION_SLOTS and head_dim <= ATTENTION_WIDTH


@functools.cache
def _attention_kernel():
    return mx.fast.cuda_kernel(name="gemma3n_attention", input_names=["q", "kv", "mask"], output_names=["out"],
                               source=_ATTENTION, header=_HEADER)


def attention(q: mx.array, kv: mx.array, mask: mx.array) -> mx.array:
    """One query token's attention as one kernel (runtime/fast.py `attention`, the generic graph,
    says what): q `[1, nq, 1, d]`, the K/V buffer `[1, 2 * nkv, slots, d]` (keys, then values),
    the additive mask `[slots]`; returns `[1, nq * d]`. Where `attends(slots, d)`."""
    nq, d, nkv = q.shape[1], q.shape[3], kv.shape[1] // 2
    threads = ATTENTION_THREADS
    template = [("T", q.dtype), ("D", d), ("G", nq // nkv), ("THREADS", threads), ("SLOTS", ATTENTION_SLOTS)]
    return _attention_kernel()(inputs=[q, kv, mask], template=template, grid=(nq * threads, 1, 1),
                               threadgroup=(threads, 1, 1), output_shapes=[(1, nq * d)], output_dtypes=[q.dtype])[0]


@functools.cache
def _heads_kernel(eps: float):
    return mx.fast.cuda_kernel(name="gemma3n_heads", input_names=["x", "position", "freq", "scale", "swapped"],
                               output_names=["out"], source=f"  constexpr float EPS = {float(eps)!r}f;\n" + _HEADS,
                               header=_HEADER)


def heads(x: mx.array, position: mx.array, table, eps: float) -> mx.array:
    """A layer's q/k/v heads `[1, n, 1, d]` normed, scaled and rotated as one kernel (runtime/fast.py
    `heads`, the generic graph, says what): `position` an int32 scalar, `table` the layer's
    (freq, scale, swapped) of `DecodeStep._rope_tables`."""
    n, d = x.shape[1], x.shape[3]
    freq, scale, swapped = table
    return _heads_kernel(eps)(inputs=[x, position, freq, scale, swapped],
                              template=[("T", x.dtype), ("D", d), ("THREADS", THREADS)],
                              grid=(n * THREADS, 1, 1), threadgroup=(THREADS, 1, 1), output_shapes=[x.shape],
                              output_dtypes=[x.dtype])[0]


def enabled(environ=None) -> bool:
    """Whether the compiled decode step uses these kernels: on a CUDA GPU, unless `MLXP_CUDA_BLOCKS`
    is `0` (any value but `0` or `1` is refused, naming the variable: runtime.load checks it
    before anything else, so a bad value stops a command at its start)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise BadValue(f"{ENV}={value!r:.40}: use 1 (the default: fused kernels on a CUDA GPU) "
                       "or 0 (the generic graph)")
    return value == "1" and mx.default_device().type == mx.gpu and mx.cuda.is_available()


class Blocks:
    """The kernels for one model, with each layer's weights they read gathered once (views of
    the loaded arrays, plus contiguous copies of pretransposed AltUp matrices); `predict`,
    `tail_predict`, `attn_laurel` and `correct` each add one node to the graph being traced,
    for layer `i`."""

    def __init__(self, config, layers):
        self.h, self.n, self.a = config.hidden_size, config.altup_num_inputs, config.altup_active_idx
        self.sparse = sparse_kernel_layers(config)
        consts = f"  constexpr float EPS = {float(config.rms_norm_eps)!r}f;\n"

        def kernel(name, inputs, outputs, body):
            return mx.fast.cuda_kernel(name=f"gemma3n_{name}", input_names=inputs, output_names=outputs,
                                       source=consts + _PRELUDE + body, header=_HEADER)

        self._predict = kernel("predict", PREDICT_IN, ["pred", "normed"], _PREDICT_LOADS + _PLANES_IN + _PREDICT)
        self._tail_predict = kernel("tail_predict", TAIL_PREDICT_IN, ["pred", "normed"],
                                   _PREDICT_LOADS + _TAIL + _PREDICT)
        self._attn_laurel = kernel("attn_laurel", ATTN_LAUREL_IN, ["attn_laurel", "ffw_input"], _ATTN_LAUREL)
        self._correct = kernel("correct", CORRECT_IN, ["activated", "correction", "first"], _CORRECT)
        self._sparse_activate = mx.fast.cuda_kernel(name="gemma3n_sparse_activate",
                                                    input_names=["gate", "up", "multiplier"], output_names=["out"],
                                                    source=_SPARSE_ACTIVATE, header=_HEADER)
        self.weights = []
        for layer in layers:
            altup = layer.altup
            self.weights.append(dict(
                router_norm=altup.router_norm.weight, router=row_major_weight(altup.modality_router),
                prediction_coefs=row_major_weight(altup.prediction_coefs),
                correction_coefs=row_major_weight(altup.correction_coefs), input_norm=layer.input_layernorm.weight,
                post_attention_norm=layer.post_attention_layernorm.weight,
                post_laurel_norm=layer.laurel.post_laurel_norm.weight,
                pre_feedforward_norm=layer.pre_feedforward_layernorm.weight,
                post_feedforward_norm=layer.post_feedforward_layernorm.weight,
                per_layer_norm=layer.post_per_layer_input_norm.weight,
                correct_scale=altup.correct_output_scale if layer.correct_scale else None,
                multiplier=None if layer.mlp.std_multiplier is None
                else mx.array([layer.mlp.std_multiplier], dtype=mx.float32)))
        mx.eval([[w for w in ws.values() if w is not None] for ws in self.weights])

    def _run(self, kernel, inputs, shapes, dtype, **flags):
        template = [("T", dtype), ("H", self.h), ("N", self.n), ("A", self.a), ("THREADS", THREADS),
                    *flags.items()]
        return kernel(inputs=inputs, template=template, grid=(THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                      output_shapes=shapes, output_dtypes=[dtype] * len(shapes))

    def _predict_weights(self, i):
        w = self.weights[i]
        return [w["router_norm"], w["router"], w["prediction_coefs"], w["input_norm"]]

    def predict(self, i, planes):
        """Layer i's AltUp predictions `[n, h]` from planes `[n, h]`, and the active prediction's
        input norm `[1, h]`."""
        return self._run(self._predict, [planes, *self._predict_weights(i)], [(self.n, self.h), (1, self.h)],
                         planes.dtype)

    def tail_predict(self, i, prev_pred, activated, correction, projected):
        """`predict` on the planes layer i - 1 ends with, from its predictions, activated output,
        correction coefficients `[n, 1]` and per-layer projection (before its norm)."""
        inputs = [prev_pred, activated, correction, projected, self.weights[i - 1]["per_layer_norm"],
                  *self._predict_weights(i)]
        return self._run(self._tail_predict, inputs, [(self.n, self.h), (1, self.h)], prev_pred.dtype)

    def attn_laurel(self, i, attn, laurel, pred, normed):
        """(attention + LAuReL residual `[1, h]`, its pre-feed-forward norm `[1, h]`) from layer i's
        o_proj output, LAuReL's right projection's output, predictions and input norm."""
        w = self.weights[i]
        inputs = [attn, laurel, pred, normed, w["post_attention_norm"], w["post_laurel_norm"],
                  w["pre_feedforward_norm"]]
        return self._run(self._attn_laurel, inputs, [(1, self.h), (1, self.h)], pred.dtype)

    def correct(self, i, mlp, attn_laurel, pred):
        """(activated `[1, h]`, correction coefficients `[n, 1]`, the active plane corrected `[1, h]`
        (scaled where the model scales it)) from layer i's MLP output."""
        w = self.weights[i]
        scaled = w["correct_scale"] is not None
        inputs = [mlp, attn_laurel, pred, w["post_feedforward_norm"], w["router_norm"], w["router"],
                  w["correction_coefs"], w["correct_scale"] if scaled else w["router_norm"]]  # unread unless scaled
        return self._run(self._correct, inputs, [(1, self.h), (self.n, 1), (1, self.h)], pred.dtype,
                         SCALED=scaled)

    def activation(self, i):
        """Layer i's `MLP.activate` as a kernel, `activate(gate, up)`, or None where the generic
        graph keeps it: a dense layer (gelu * up is one kernel already) or a gate wider than
        SPARSE_WIDTH."""
        if i not in self.sparse:
            return None
        return lambda gate, up: self.sparse_activate(i, gate, up)

    @staticmethod
    def heads(x, position, table, eps):
        return heads(x, position, table, eps)

    @staticmethod
    def attends(slots: int, head_dim: int) -> bool:
        return attends(slots, head_dim)

    @staticmethod
    def attention(q, kv, mask):
        return attention(q, kv, mask)

    def sparse_activate(self, i, gate, up):
        """Layer i's `MLP.activate` (an activation-sparse layer's) on gate and up `[1, width]`."""
        width = gate.shape[-1]
        return self._sparse_activate(inputs=[gate, up, self.weights[i]["multiplier"]],
                                     template=[("T", gate.dtype), ("W", width), ("THREADS", SPARSE_THREADS)],
                                     grid=(SPARSE_THREADS, 1, 1), threadgroup=(SPARSE_THREADS, 1, 1),
                                     output_shapes=[gate.shape], output_dtypes=[gate.dtype])[0]
