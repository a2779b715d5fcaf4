// Activation quantization for the int8 compute mode; the format is described in int8_rows.h.
// Scalar and portable on purpose: it runs once per row per chunk (O(K)), against O(K * N) kernel work.
#include "cpu/int8_rows.h"

#include <cmath>
#include <cstring>

namespace qmoe::cpu {

void quantize_row_int8(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q, int32_t* nsum,
                       float* sx) {
  const int64_t G = int8_group_cols(block_size), groups = (W + G - 1) / G;
  std::memset(q, 0, size_t(W));
  for (int64_t g = 0; g < groups; ++g) nsum[g] = 0;
  float m = 0.f;
  bool finite = true;
  for (int64_t c = 0; c < K; ++c) {
    finite = finite && std::isfinite(x[c]);
    m = std::fmax(m, std::fabs(x[c]));
  }
  if (!finite) {
    *sx = std::nanf("");
    return;
  }
  *sx = m / 127.f;
  if (m == 0.f) return;
  const double inv = 127.0 / double(m);  // double: no overflow for tiny m, and |x * inv| <= 127 exactly
  for (int64_t c = 0; c < K; ++c) {
    const int v = int(std::nearbyint(double(x[c]) * inv));  // default rounding: nearest even
    q[int8_column_slot(bits, c)] = int8_t(v);
    nsum[c / G] -= v;
  }
}

}  // namespace qmoe::cpu
