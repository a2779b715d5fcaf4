// Backends and the packed weights they own.
//
// A backend turns raw experts into its own packed layout once, at load ("prepack"), and runs the
// layer from that layout. PackedExperts is tagged with the layout it holds (name + version), the
// target it was made for and the spec it was validated against; a backend refuses any other layout
// with an error naming both, so raw bytes or another backend's bytes never reach a kernel.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/inputs.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

struct LayoutTag {
  std::string name;      // e.g. "raw", "cpu-avx512-w4", "cuda-sm80-w4"
  uint32_t version = 1;  // bumped whenever the byte layout changes
  std::string target;    // hardware it runs on, e.g. "any", "cpu-avx512", "cuda-sm90"

  bool operator==(const LayoutTag&) const = default;
  std::string to_string() const;  // "cpu-avx512-w4 v1 (target cpu-avx512)"
};

class PackedExperts {
 public:
  virtual ~PackedExperts() = default;
  const LayoutTag& tag() const { return tag_; }
  const MoeSpec& spec() const { return spec_; }
  // Bytes of weights resident after packing (host or device).
  virtual size_t resident_bytes() const = 0;
  // The payload as named host tensors, for writing a packed file (device data is copied to host).
  // Backend::from_blobs() must rebuild an identical object from them.
  virtual std::vector<NamedTensor> to_blobs() const = 0;

 protected:
  PackedExperts(LayoutTag tag, MoeSpec spec) : tag_(std::move(tag)), spec_(std::move(spec)) {}

 private:
  LayoutTag tag_;
  MoeSpec spec_;
};

// The raw layout as packed-file blobs ("fc1.weights", "fc1.scales", "fc1.zero_points", "fc1.bias",
// likewise fc2 and fc3), for every backend whose packed form keeps the raw bytes.
std::vector<NamedTensor> raw_to_blobs(const RawExperts& raw);
// The inverse: checks each blob's dtype and shape under its blob name, refuses missing and unexpected
// blobs (naming `layout`), then validate_raw against the spec.
RawExperts raw_from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs, std::string_view layout);

// Throws qmoe::Error "<who>: weights are in layout X, expected Y" unless the tags match.
void require_layout(const PackedExperts& packed, const LayoutTag& expected, std::string_view who);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Validates and packs; takes the raw tensors by value so buffers qmoe owns are freed as soon as
  // they are packed.
  virtual std::unique_ptr<PackedExperts> prepack(const MoeSpec& spec, RawExperts raw) = 0;
  // The layout prepack() would produce for this spec on this machine (what a packed file must hold).
  virtual LayoutTag layout_for(const MoeSpec& spec) const = 0;
  // Rebuilds packed experts from a packed file's blobs; the caller has checked the tag equals
  // layout_for(spec). Throws qmoe::Error naming a missing or mis-sized blob.
  virtual std::unique_ptr<PackedExperts> from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs) = 0;
  // Runs the layer. `output` must have the input's shape and dtype; it is fully overwritten.
  virtual void run(const PackedExperts& packed, const MoeInputs& inputs, Tensor& output) = 0;
};

// The plain scalar oracle (src/cpu/reference_backend.cpp). Its packed form is the raw layout itself.
std::unique_ptr<Backend> make_reference_backend();

struct CpuBackendOptions {
  int threads = 0;           // 0 = all cores
  bool prepack = true;       // false: keep raw bytes and run the raw-layout kernels
  // "auto", "portable", "avx2", "avx512", or "amx" (compute "int8" and "int8x3" only: their tile
  // multiplies; "avx512" then means the int8 mode without them). "auto" takes the best the CPU has, AMX
  // included.
  std::string isa = "auto";
  // Token rows per chunk, R. A run goes through its T token rows at most R at a time; its scratch is
  // sized for one chunk and kept across runs, so it stays at most
  //   min(T, R) * (4 * (round64(H + 8) + k * (round64(I + 8) + H)) + 16 * k) bytes
  // (T: the largest run so far) however large T is. Outputs are bitwise the same for every R.
  // 0 = as many rows as fit in 256 MiB, at least 1: 1630 rows for Mixtral-8x7B (H 4096, I 14336, k 2).
  int64_t max_chunk_rows = 0;
  // Arithmetic of the kernels (int4 and int8 weights; 2-bit always runs exact):
  //   "exact" (default): fp32 throughout, the contract of src/cpu/cpu_kernels.h; agrees with the
  //           reference within the fp32 tolerances of docs/AGREEMENT.md.
  //   "bf16":  an accuracy option for prefill. Each chunk's fp32 activations (the layer input and the
  //           FC1 outputs) are rounded once to bf16 (nearest even) and multiplied with the exact
  //           integer weights (q - z) by vdpbf16ps, accumulating in fp32; scales still apply in fp32
  //           per block. Each product changes by at most 2^-8 relative, so one output of one GEMM
  //           moves by at most 2^-8 * sum |s (q - z) x| (+ fp32 rounding); whole layers agree with the
  //           reference to a relative L2 error of 8e-3 (typically 2-3.5e-3; docs/DESIGN.md,
  //           "Numerics"). Deterministic: bitwise the same for every chunk size and thread count.
  //           Needs AVX-512 F/BW/VL and AVX512_BF16 (isa "auto" or "avx512"); otherwise refused.
  //           Scratch grows by 2 * (round64(H + 8) + k * round64(I + 8)) bytes per row (bf16 rows).
  //   "int8":  an accuracy option for prefill, faster than bf16. The same activations are quantized once
  //           per chunk to int8 with one fp32 scale per row (sx = max|x| / 127, nearest even) and
  //           multiplied with the weight codes by vpdpbusd (or AMX tile multiplies, the same integers),
  //           exactly in int32 within groups of
  //           min(block, 256) columns; scales apply in fp32 per group, sx at the end. One output of
  //           one GEMM moves by at most (sx / 2) * sum |s (q - z)| (+ fp32 rounding); whole layers agree
  //           with the reference to a relative L2 error of 4e-2 (typically 1-2e-2; docs/DESIGN.md,
  //           "Numerics"). Deterministic like bf16, and bitwise the same with or without AMX. Needs
  //           AVX-512 F/BW/VL and AVX512_VNNI (isa "auto", "avx512" or "amx"; "amx" also AMX-TILE,
  //           AMX-INT8 and AVX512_VBMI); otherwise refused. Scratch grows by k * ((X + A) + 4 * (X / 16
  //           + A / 16) + 16) bytes per row (X = round64(H + 8), A = round64(I + 8)).
  //   "int8x3": fp32-level accuracy at tile-multiply speed, for prefill on CPUs with AMX. Each activation
  //           row becomes three int8 digits of base 254 under the int8 mode's scale (x ~= sx * (q0 + q1 /
  //           254 + q2 / 254^2), each element within max|x| * 6.1e-8, the fp32 half-ulp of the row's
  //           largest value); each digit's group sums are exact int32 tile multiplies, combined in fp32
  //           per group. 4-bit weights in blocks of 16 or 32 take four digits instead, two 12-bit pairs
  //           (x ~= sx * (4096 (16 a + b) + 16 c + d), sx = max|x| / 2^23, the same bound), so that a
  //           block's two pairs are two full tile multiplies. Whole layers sit as close to the reference as the exact mode does (relative L2
  //           1-6e-7 on fp32 layers, tested to 4e-6; docs/DESIGN.md, "Numerics"). Deterministic like
  //           int8 (calls of 1-2 tokens take vpdpbusd, bitwise the same). Needs AMX-TILE, AMX-INT8,
  //           AVX512_VNNI and AVX512_VBMI with the OS's tile grant (isa "auto" or "amx"); otherwise
  //           refused. Scratch grows by k * (D * ((X + A) + 4 * (X / 16 + A / 16)) + 16) bytes per row
  //           (D = 4 digits for 4-bit blocks of 16 or 32, else 3).
  std::string compute = "exact";
};
// The fast CPU backend (src/cpu/): SIMD kernels chosen at run time, multi-threaded.
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& opt = {});

}  // namespace qmoe
