// Element types qmoe handles and the scalar conversions between them.
//
// Activations (contract type T) and scales (T2) are float32, float16 or bfloat16; quantized weights
// and zero points are uint8 bytes. All arithmetic happens in fp32: these conversions are the only
// place fp16/bf16 bits are interpreted, so every backend rounds the same way (round to nearest even,
// NaN kept NaN).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace qmoe {

enum class DType : uint8_t { f32, f16, bf16, u8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::u8: return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::u8: return "uint8";
  }
  return "?";
}

constexpr bool is_float(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16; }

// Parses "float32"/"fp32"/"f32", "float16"/"fp16"/"f16", "bfloat16"/"bf16", "uint8"/"u8".
// Throws qmoe::Error on anything else.
DType parse_dtype(std::string_view name);

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                           // round to nearest even
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  // subnormal: value = man * 2^-24, exact in fp32
  const float v = float(man) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN stays NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                       // rounds to inf
  if (a < 0x38800000u) {                                                      // subnormal or zero
    // value / 2^-24 rounded to nearest even; the float add does the rounding for us.
    const float scaled = bits_to_float(a) * 16777216.0f;  // exact power-of-two scaling
    const float magic = 8388608.0f;                       // 2^23: forces integer rounding
    const uint32_t r = float_to_bits(scaled + magic) - float_to_bits(magic);
    return uint16_t(sign | r);
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112<<23) and round
  return uint16_t(sign | (r >> 13));
}

// Reads element i of a float buffer of type t as fp32. Goes through memcpy so user buffers need no
// particular alignment (a NumPy view or a file region may be offset by any byte count).
inline float load_as_float(DType t, const void* p, int64_t i) {
  const auto* b = static_cast<const unsigned char*>(p);
  switch (t) {
    case DType::f32: {
      float v;
      std::memcpy(&v, b + i * 4, 4);
      return v;
    }
    case DType::f16:
    case DType::bf16: {
      uint16_t h;
      std::memcpy(&h, b + i * 2, 2);
      return t == DType::f16 ? half_to_float(h) : bf16_to_float(h);
    }
    case DType::u8: return float(b[i]);
  }
  return 0.f;
}

// Writes v, rounded once to type t, into element i of a float buffer (any alignment).
inline void store_from_float(DType t, void* p, int64_t i, float v) {
  auto* b = static_cast<unsigned char*>(p);
  switch (t) {
    case DType::f32: std::memcpy(b + i * 4, &v, 4); break;
    case DType::f16:
    case DType::bf16: {
      const uint16_t h = t == DType::f16 ? float_to_half(v) : float_to_bf16(v);
      std::memcpy(b + i * 2, &h, 2);
      break;
    }
    case DType::u8: b[i] = uint8_t(v); break;
  }
}

}  // namespace qmoe
