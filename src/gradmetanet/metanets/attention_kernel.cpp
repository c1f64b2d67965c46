// Fused softmax attention for small heads on CPU: GradMetaNet++'s attention over the set and over neurons.
//
// qkv [B, X, Y, 3 H d] (float32, contiguous) packs queries, keys and values; attention runs along X
// (seq_dim 1) or Y (seq_dim 2), separately for every index of the other axes and every head. One task is one
// (sequence, head). Every loop is vertical over 16 lanes (GCC/Clang vector extensions; AVX-512 or two AVX2
// halves): 16 queries per vector in the forward pass and for the query gradient, 16 keys per vector for the
// key and value gradients, so no horizontal reduction is ever needed. The forward pass keeps each query's
// log-sum-exp; the backward pass recomputes the probabilities from it (flash attention's recipe), so no L x L
// matrix is stored. Heads of d <= 16 features are padded with zeros to D = 4, 8 or 16 (a compile-time width).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t W = 16;

inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (a score minus its row's maximum or log-sum-exp), about 1 ulp: Cody-Waite reduction
// x = n ln2 + r, Cephes' degree-6 polynomial for exp(r), 2^n assembled in the exponent bits.
inline vf exp_nonpositive(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);   // round to nearest, x <= 0
  const vf fn = __builtin_convertvector(n, vf);
  const vf r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vf)((n + 127) << 23);                         // a cast between vector types keeps the bits
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Where the rows of one sequence lie: row(s, i) = (s / inner) * outer + (s % inner) * inner_step + i * pos_stride,
// counted in rows of the [B X Y, features] view of qkv (and of the output).
struct Layout {
  int64_t sequences, length, heads, head_dim, inner, outer, inner_step, pos_stride;

  int64_t row(int64_t s, int64_t i) const { return (s / inner) * outer + (s % inner) * inner_step + i * pos_stride; }
};

Layout layout_of(const torch::Tensor& qkv, int64_t heads, int64_t seq_dim) {
  const int64_t B = qkv.size(0), X = qkv.size(1), Y = qkv.size(2), d = qkv.size(3) / (3 * heads);
  if (seq_dim == 2) return {B * X, Y, heads, d, 1, Y, 0, 1};
  return {B * Y, X, heads, d, Y, X * Y, 1, Y};
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && !t.is_cuda(), "fused attention: ", name,
              " must be a contiguous float32 CPU tensor");
}

void check_qkv(const torch::Tensor& qkv, int64_t heads, int64_t seq_dim) {
  check(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 4 && heads > 0 && qkv.size(3) % (3 * heads) == 0 && qkv.size(3) / (3 * heads) <= 16,
              "fused attention takes qkv [B, X, Y, 3 * heads * d] with d <= 16");
  TORCH_CHECK(seq_dim == 1 || seq_dim == 2, "seq_dim must be 1 or 2");
}

// One (sequence, head)'s vectors, gathered and zero-padded: rows [L, D] (a key's or query's features together)
// and lane blocks [ceil(L / 16), D] (16 queries' or keys' values of one feature per vector).
template <int D>
struct Gathered {
  std::vector<float> rows;
  std::vector<vf> lanes;

  void resize(int64_t L) {
    rows.assign(L * D, 0.0f);
    lanes.assign(((L + W - 1) / W) * D, vf{});
  }

  // features [offset, offset + d) of every position's row of `src` (row width `width`), times `scale`
  void load(const float* src, const Layout& a, int64_t s, int64_t width, int64_t offset, float scale) {
    const int64_t L = a.length, d = a.head_dim;
    for (int64_t i = 0; i < L; ++i) {
      const float* row = src + a.row(s, i) * width + offset;
      for (int64_t e = 0; e < d; ++e) {
        rows[i * D + e] = row[e] * scale;
        lanes[(i / W) * D + e][i % W] = row[e] * scale;
      }
    }
  }
};

template <int D>
void forward_task(const float* qkv, float* out, float* lse, const Layout& a, int64_t s, int64_t h,
                  Gathered<D>& q, Gathered<D>& k, Gathered<D>& v, std::vector<vf>& scores) {
  const int64_t L = a.length, d = a.head_dim, hd = a.heads * d, width = 3 * hd;
  q.load(qkv, a, s, width, h * d, 1.0f / std::sqrt(static_cast<float>(d)));
  k.load(qkv, a, s, width, hd + h * d, 1.0f);
  v.load(qkv, a, s, width, 2 * hd + h * d, 1.0f);
  for (int64_t block = 0; block * W < L; ++block) {
    const vf* qT = q.lanes.data() + block * D;
    vf m = splat(-3.0e38f);
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = k.rows.data() + j * D;
      vf sc = qT[0] * kj[0];
      for (int e = 1; e < D; ++e) sc += qT[e] * kj[e];
      scores[j] = sc;
      m = vmax(m, sc);
    }
    vf total{}, acc[D] = {};
    for (int64_t j = 0; j < L; ++j) {
      const vf p = exp_nonpositive(scores[j] - m);
      const float* vj = v.rows.data() + j * D;
      total += p;
      for (int e = 0; e < D; ++e) acc[e] += p * vj[e];
    }
    for (int64_t lane = 0; lane < W && block * W + lane < L; ++lane) {
      const int64_t i = block * W + lane;
      float* row = out + a.row(s, i) * hd + h * d;
      for (int64_t e = 0; e < d; ++e) row[e] = acc[e][lane] / total[lane];
      lse[(s * a.heads + h) * L + i] = m[lane] + std::log(total[lane]);
    }
  }
}

template <int D>
void backward_task(const float* qkv, const float* grad_out, const float* out, const float* lse, float* grad,
                   const Layout& a, int64_t s, int64_t h, Gathered<D>& q, Gathered<D>& k, Gathered<D>& v,
                   Gathered<D>& go, std::vector<float>& rowdot, std::vector<vf>& lse_lanes, std::vector<vf>& dot_lanes) {
  const int64_t L = a.length, d = a.head_dim, hd = a.heads * d, width = 3 * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  q.load(qkv, a, s, width, h * d, scale);
  k.load(qkv, a, s, width, hd + h * d, 1.0f);
  v.load(qkv, a, s, width, 2 * hd + h * d, 1.0f);
  go.load(grad_out, a, s, hd, h * d, 1.0f);
  const float* lse_s = lse + (s * a.heads + h) * L;
  std::fill(lse_lanes.begin(), lse_lanes.end(), vf{});
  std::fill(dot_lanes.begin(), dot_lanes.end(), vf{});
  for (int64_t i = 0; i < L; ++i) {                       // rowdot_i = dO_i . O_i
    const float* o = out + a.row(s, i) * hd + h * d;
    float dot = 0.0f;
    for (int64_t e = 0; e < d; ++e) dot += go.rows[i * D + e] * o[e];
    rowdot[i] = dot;
    dot_lanes[i / W][i % W] = dot;
    lse_lanes[i / W][i % W] = lse_s[i];
  }
  // query gradient, 16 queries per vector: dQ_i = scale * sum_j dS_ij k_j, dS = P * (dO V^T - rowdot)
  for (int64_t block = 0; block * W < L; ++block) {
    const vf* qT = q.lanes.data() + block * D;
    const vf* gT = go.lanes.data() + block * D;
    vf dq[D] = {};
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = k.rows.data() + j * D;
      const float* vj = v.rows.data() + j * D;
      vf sc = qT[0] * kj[0], dp = gT[0] * vj[0];
      for (int e = 1; e < D; ++e) {
        sc += qT[e] * kj[e];
        dp += gT[e] * vj[e];
      }
      const vf ds = exp_nonpositive(sc - lse_lanes[block]) * (dp - dot_lanes[block]);
      for (int e = 0; e < D; ++e) dq[e] += ds * kj[e];
    }
    for (int64_t lane = 0; lane < W && block * W + lane < L; ++lane) {
      float* row = grad + a.row(s, block * W + lane) * width + h * d;
      for (int64_t e = 0; e < d; ++e) row[e] = dq[e][lane] * scale;
    }
  }
  // key and value gradients, 16 keys per vector: dK_j = sum_i dS_ij (scaled q_i), dV_j = sum_i P_ij dO_i
  for (int64_t block = 0; block * W < L; ++block) {
    const vf* kT = k.lanes.data() + block * D;
    const vf* vT = v.lanes.data() + block * D;
    vf dk[D] = {}, dv[D] = {};
    for (int64_t i = 0; i < L; ++i) {
      const float* qi = q.rows.data() + i * D;
      const float* gi = go.rows.data() + i * D;
      vf sc = kT[0] * qi[0], dp = vT[0] * gi[0];
      for (int e = 1; e < D; ++e) {
        sc += kT[e] * qi[e];
        dp += vT[e] * gi[e];
      }
      const vf p = exp_nonpositive(sc - lse_s[i]);
      const vf ds = p * (dp - rowdot[i]);
      for (int e = 0; e < D; ++e) {
        dk[e] += ds * qi[e];
        dv[e] += p * gi[e];
      }
    }
    for (int64_t lane = 0; lane < W && block * W + lane < L; ++lane) {
      float* row = grad + a.row(s, block * W + lane) * width + h * d;
      for (int64_t e = 0; e < d; ++e) {
        row[hd + e] = dk[e][lane];
        row[2 * hd + e] = dv[e][lane];
      }
    }
  }
}

template <int D>
void forward_all(const torch::Tensor& qkv, torch::Tensor& out, torch::Tensor& lse, const Layout& a) {
  at::parallel_for(0, a.sequences * a.heads, 1, [&](int64_t begin, int64_t end) {
    Gathered<D> q, k, v;
    q.resize(a.length), k.resize(a.length), v.resize(a.length);
    std::vector<vf> scores(a.length);
    for (int64_t t = begin; t < end; ++t)
      forward_task<D>(qkv.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), a, t / a.heads,
                      t % a.heads, q, k, v, scores);
  });
}

template <int D>
void backward_all(const torch::Tensor& qkv, const torch::Tensor& grad_out, const torch::Tensor& out,
                  const torch::Tensor& lse, torch::Tensor& grad, const Layout& a) {
  at::parallel_for(0, a.sequences * a.heads, 1, [&](int64_t begin, int64_t end) {
    Gathered<D> q, k, v, go;
    q.resize(a.length), k.resize(a.length), v.resize(a.length), go.resize(a.length);
    std::vector<float> rowdot(a.length);
    std::vector<vf> lse_lanes((a.length + W - 1) / W), dot_lanes((a.length + W - 1) / W);
    for (int64_t t = begin; t < end; ++t)
      backward_task<D>(qkv.data_ptr<float>(), grad_out.data_ptr<float>(), out.data_ptr<float>(),
                       lse.data_ptr<float>(), grad.data_ptr<float>(), a, t / a.heads, t % a.heads, q, k, v, go,
                       rowdot, lse_lanes, dot_lanes);
  });
}

}  // namespace

std::vector<torch::Tensor> attention_forward(torch::Tensor qkv, int64_t heads, int64_t seq_dim) {
  check_qkv(qkv, heads, seq_dim);
  const Layout a = layout_of(qkv, heads, seq_dim);
  auto out = torch::empty({qkv.size(0), qkv.size(1), qkv.size(2), heads * a.head_dim}, qkv.options());
  auto lse = torch::empty({a.sequences, heads, a.length}, qkv.options());
  if (a.head_dim <= 4) forward_all<4>(qkv, out, lse, a);
  else if (a.head_dim <= 8) forward_all<8>(qkv, out, lse, a);
  else forward_all<16>(qkv, out, lse, a);
  return {out, lse};
}

torch::Tensor attention_backward(torch::Tensor grad_out, torch::Tensor qkv, torch::Tensor out, torch::Tensor lse,
                                 int64_t heads, int64_t seq_dim) {
  check_qkv(qkv, heads, seq_dim);
  check(grad_out, "grad_out"), check(out, "out"), check(lse, "lse");
  const Layout a = layout_of(qkv, heads, seq_dim);
  auto grad = torch::empty_like(qkv);
  if (a.head_dim <= 4) backward_all<4>(qkv, grad_out, out, lse, grad, a);
  else if (a.head_dim <= 8) backward_all<8>(qkv, grad_out, out, lse, grad, a);
  else backward_all<16>(qkv, grad_out, out, lse, grad, a);
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "fused small-head attention, forward: (out, log-sum-exp [S, H, L])");
  m.def("backward", &attention_backward, "fused small-head attention, backward: the gradient of qkv");
}
