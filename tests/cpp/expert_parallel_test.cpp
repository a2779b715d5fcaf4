// Expert parallelism, host side (include/qmoe/expert_parallel.h): expert ranges and owners, token
// slices, local specs, zero-copy expert slices (also of a memory-mapped raw file), scheme choice.
// These decide what every rank of cuda_ep.cpp does, so they are tested here, without a GPU.
#include <gtest/gtest.h>

#include <cstring>

#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "qmoe/expert_parallel.h"
#include "qmoe/synthetic.h"
#include "temp_dir.h"

using namespace qmoe;

namespace {

TEST(ExpertParallel, RangesPartitionExpertsInOrder) {
  for (int world = 1; world <= kEpMaxWorld; ++world)
    for (int64_t E = world; E <= 300; E += (E < 40 ? 1 : 37)) {
      int64_t next = 0, lo = E, hi = 0;
      for (int r = 0; r < world; ++r) {
        const ExpertRange er = expert_range_for_rank(E, r, world);
        ASSERT_EQ(er.first, next) << "E=" << E << " world=" << world << " rank=" << r;
        ASSERT_GE(er.count, 1);
        lo = std::min(lo, er.count), hi = std::max(hi, er.count);
        for (int64_t e = er.first; e < er.end(); ++e)
          ASSERT_EQ(owner_of_expert(E, world, e), r) << "E=" << E << " world=" << world << " e=" << e;
        next = er.end();
      }
      EXPECT_EQ(next, E);
      EXPECT_LE(hi - lo, 1) << "balanced split, E=" << E << " world=" << world;
    }
}

TEST(ExpertParallel, RangesExamples) {
  EXPECT_EQ(expert_range_for_rank(8, 0, 2), (ExpertRange{0, 4}));
  EXPECT_EQ(expert_range_for_rank(8, 1, 2), (ExpertRange{4, 4}));
  EXPECT_EQ(expert_range_for_rank(5, 0, 2), (ExpertRange{0, 3}));  // E % G != 0: the first ranks hold one more
  EXPECT_EQ(expert_range_for_rank(5, 1, 2), (ExpertRange{3, 2}));
  EXPECT_EQ(expert_range_for_rank(256, 1, 2), (ExpertRange{128, 128}));
  EXPECT_EQ(expert_range_for_rank(8, 7, 8), (ExpertRange{7, 1}));
}

TEST(ExpertParallel, RangesRefuseBadWorlds) {
  EXPECT_THROW(expert_range_for_rank(1, 0, 2), Error);  // fewer experts than ranks
  try {
    expert_range_for_rank(3, 0, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 experts cannot be split over 4 ranks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(expert_range_for_rank(8, 0, 0), Error);
  EXPECT_THROW(expert_range_for_rank(64, 0, kEpMaxWorld + 1), Error);
  EXPECT_THROW(expert_range_for_rank(8, 2, 2), Error);
  EXPECT_THROW(expert_range_for_rank(8, -1, 2), Error);
}

TEST(ExpertParallel, TokenSlicesCoverRowsOnce) {
  for (int world = 1; world <= 8; ++world)
    for (int64_t T : {0, 1, 2, 3, 7, 8, 64, 65, 2047, 2048}) {
      int64_t next = 0;
      for (int r = 0; r < world; ++r) {
        const TokenSlice s = token_slice_for_rank(T, r, world);
        EXPECT_EQ(s.stride, (T + world - 1) / world);
        EXPECT_LE(s.count, s.stride);
        EXPECT_GE(s.count, 0);
        if (s.count) EXPECT_EQ(s.first, next) << "T=" << T << " world=" << world << " rank=" << r;
        EXPECT_EQ(s.first, std::min<int64_t>(T, r * s.stride));  // the all-gather's block of this rank
        next += s.count;
      }
      EXPECT_EQ(next, T);
    }
  const TokenSlice a = token_slice_for_rank(1, 1, 2);  // fewer tokens than ranks: rank 1 routes none
  EXPECT_EQ(a.count, 0);
  EXPECT_EQ(a.stride, 1);
  EXPECT_THROW(token_slice_for_rank(-1, 0, 2), Error);
}

MoeSpec full_spec() {
  MoeSpec s;
  s.num_experts = 5, s.k = 3, s.hidden = 64, s.inter = 32, s.bits = 4, s.block_size = 32;
  s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::separate;
  s.act_dtype = DType::bf16, s.scale_dtype = DType::f16;
  s.fc1_bias = s.fc2_bias = s.fc3_bias = true;
  s.fc1_zero_points = s.fc2_zero_points = s.fc3_zero_points = true;
  return s;
}

TEST(ExpertParallel, LocalSpecClipsKAndKeepsShapes) {
  MoeSpec s = full_spec();
  const MoeSpec a = local_spec(s, {0, 3});
  EXPECT_EQ(a.num_experts, 3);
  EXPECT_EQ(a.k, 3);
  EXPECT_NO_THROW(a.validate());
  const MoeSpec b = local_spec(s, {3, 2});
  EXPECT_EQ(b.k, 2);  // k = 3 > 2 local experts: routing keeps k = 3 (global spec), the weights need no k
  EXPECT_NO_THROW(b.validate());
  s.k = 2, s.use_sparse_mixer = true, s.num_experts = 3;
  const MoeSpec c = local_spec(s, {2, 1});
  EXPECT_EQ(c.k, 1);
  EXPECT_FALSE(c.use_sparse_mixer);
  EXPECT_NO_THROW(c.validate());
  EXPECT_THROW(local_spec(s, {2, 2}), Error);
  EXPECT_THROW(local_spec(s, {0, 0}), Error);
}

void expect_slice_of(const Tensor& part, const Tensor& whole, int64_t E, const ExpertRange& r, const char* what) {
  const size_t per = whole.nbytes() / size_t(E);
  ASSERT_EQ(part.nbytes(), per * size_t(r.count)) << what;
  EXPECT_EQ(part.dim(0), r.count) << what;
  // A view, not a copy: the same bytes at the expert's offset.
  EXPECT_EQ(static_cast<const uint8_t*>(part.data()), static_cast<const uint8_t*>(whole.data()) + per * size_t(r.first))
      << what;
}

void expect_matrix_slice(const RawMatrix& p, const RawMatrix& w, int64_t E, const ExpertRange& r) {
  expect_slice_of(p.weights, w.weights, E, r, "weights");
  expect_slice_of(p.scales, w.scales, E, r, "scales");
  ASSERT_TRUE(p.zero_points && p.bias);
  expect_slice_of(*p.zero_points, *w.zero_points, E, r, "zero points");
  expect_slice_of(*p.bias, *w.bias, E, r, "bias");
}

TEST(ExpertParallel, SliceExpertsIsAZeroCopyView) {
  const MoeSpec s = full_spec();
  SyntheticLayer L = make_synthetic_layer(s, {});
  for (int world : {1, 2, 3, 5})
    for (int r = 0; r < world; ++r) {
      const ExpertRange er = expert_range_for_rank(s.num_experts, r, world);
      const RawExperts part = slice_experts(s, L.raw, er);
      EXPECT_NO_THROW(validate_raw(local_spec(s, er), part));
      expect_matrix_slice(part.fc1, L.raw.fc1, s.num_experts, er);
      expect_matrix_slice(part.fc2, L.raw.fc2, s.num_experts, er);
      ASSERT_TRUE(part.fc3);
      expect_matrix_slice(*part.fc3, *L.raw.fc3, s.num_experts, er);
    }
}

TEST(ExpertParallel, SliceKeepsParentAlive) {
  const MoeSpec s = full_spec();
  RawExperts part;
  std::vector<uint8_t> want;
  {
    SyntheticLayer L = make_synthetic_layer(s, {});
    const ExpertRange er{3, 2};
    part = slice_experts(s, L.raw, er);
    const size_t per = L.raw.fc2.weights.nbytes() / 5;
    const auto* p = L.raw.fc2.weights.data_as<uint8_t>() + 3 * per;
    want.assign(p, p + 2 * per);
  }  // the layer is gone; the slice still owns its bytes
  ASSERT_EQ(part.fc2.weights.nbytes(), want.size());
  EXPECT_EQ(std::memcmp(part.fc2.weights.data(), want.data(), want.size()), 0);
}

TEST(ExpertParallel, SliceOfMemoryMappedRawFile) {
  const MoeSpec s = full_spec();
  SyntheticLayer L = make_synthetic_layer(s, {});
  test::TempDir dir;
  RawLayer layer;
  layer.spec = s;
  layer.raw = L.raw;
  write_raw_safetensors(dir / "layer.safetensors", layer);
  const RawLayer back = read_raw_safetensors(dir / "layer.safetensors");
  const ExpertRange er = expert_range_for_rank(s.num_experts, 1, 2);  // experts [3, 5)
  const RawExperts part = slice_experts(back.spec, back.raw, er);
  const size_t per = L.raw.fc1.weights.nbytes() / 5;
  ASSERT_EQ(part.fc1.weights.nbytes(), 2 * per);
  EXPECT_EQ(std::memcmp(part.fc1.weights.data(), L.raw.fc1.weights.data_as<uint8_t>() + 3 * per, 2 * per), 0);
  expect_matrix_slice(part.fc2, back.raw.fc2, s.num_experts, er);
}

TEST(ExpertParallel, SliceRejectsBadInput) {
  const MoeSpec s = full_spec();
  SyntheticLayer L = make_synthetic_layer(s, {});
  EXPECT_THROW(slice_experts(s, L.raw, {4, 2}), Error);  // past E
  MoeSpec other = s;
  other.hidden = 128;
  EXPECT_THROW(slice_experts(other, L.raw, {0, 2}), Error);  // raw does not match the spec
}

TEST(ExpertParallel, SchemeNames) {
  for (EpScheme e : {EpScheme::allreduce, EpScheme::alltoall, EpScheme::automatic})
    EXPECT_EQ(parse_ep_scheme(ep_scheme_name(e)), e);
  EXPECT_THROW(parse_ep_scheme("all-to-all"), Error);
}

TEST(ExpertParallel, SchemeTableNearestInLog2) {
  EpSchemeTable t;
  EXPECT_EQ(t.choose(64), EpScheme::allreduce);  // untuned: the fallback
  EXPECT_EQ(t.choose(64, EpScheme::alltoall), EpScheme::alltoall);
  t.set(64, EpScheme::allreduce);
  t.set(2048, EpScheme::alltoall);
  EXPECT_EQ(t.to_string(), "64:allreduce 2048:alltoall");
  EXPECT_EQ(t.choose(1), EpScheme::allreduce);
  EXPECT_EQ(t.choose(300), EpScheme::allreduce);   // 300/64 = 4.7 < 2048/300 = 6.8
  EXPECT_EQ(t.choose(400), EpScheme::alltoall);    // 400/64 = 6.25 > 2048/400 = 5.1
  EXPECT_EQ(t.choose(362), EpScheme::allreduce);   // ~ the geometric mean (362.04): the smaller wins
  EXPECT_EQ(t.choose(100000), EpScheme::alltoall);
  t.set(2048, EpScheme::allreduce);  // re-measured: replaced, not added
  EXPECT_EQ(t.to_string(), "64:allreduce 2048:allreduce");
  EXPECT_THROW(t.set(8, EpScheme::automatic), Error);
  EXPECT_THROW(t.set(0, EpScheme::alltoall), Error);
}

}  // namespace
