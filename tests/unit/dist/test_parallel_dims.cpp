// ParallelDims: validation messages carry the arithmetic, the rank order is the documented
// one, and the layer split gives the first/last stage at most one layer fewer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>

#include "runtime/dist/comm_ops.h"
#include "runtime/dist/parallel_dims.h"
#include "text/model/parallelize.h"

using namespace llama3;
using namespace llama3::dist;

namespace {
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(ParallelDims, WorldSizeMismatchShowsTheProduct) {
  ParallelDims d{.dp_replicate = 1, .dp_shard = 2, .cp = 1, .tp = 2, .pp = 2};
  EXPECT_THAT(error_of([&] { d.validate(4); }),
              testing::HasSubstr("dp_replicate 1 x dp_shard 2 x cp 1 x tp 2 x pp 2 = 8 != world size 4"));
  EXPECT_EQ(error_of([&] { d.validate(8); }), "");
}

TEST(ParallelDims, ModelShapeErrorsShowTheNumbers) {
  ModelShape m{.n_heads = 4, .n_kv_heads = 2, .n_layers = 4, .ffn_hidden = 192, .vocab = 512, .seq_len = 32,
               .global_batch = 8};
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.tp = 4}, m); }),
              testing::HasSubstr("n_kv_heads 2 is not divisible by tp 4"));
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.tp = 3}, m); }),
              testing::HasSubstr("n_heads 4 is not divisible by tp 3"));
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.pp = 8}, m); }),
              testing::HasSubstr("4 layers cannot fill pp 8 x virtual stages 1 = 8 stages"));
  ModelShape m7 = m;
  m7.n_layers = 7;
  EXPECT_EQ(error_of([&] { validate_for_model(ParallelDims{.pp = 4}, m7); }), "");  // 2 2 2 1
  m7.n_layers = 9;  // 4 stages x 3 = 12: three layers short
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.pp = 4}, m7); }),
              testing::HasSubstr("9 layers are not divisible across pp 4 x virtual stages 1 = 4 stages"));
  ModelShape ms = m;
  ms.seq_len = 36;
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.cp = 4}, ms); }),
              testing::HasSubstr("seq 36 is not divisible by 2 x cp 4 = 8"));
  ModelShape mb = m;
  mb.global_batch = 6;
  EXPECT_THAT(error_of([&] { validate_for_model(ParallelDims{.dp_replicate = 2, .dp_shard = 2}, mb); }),
              testing::HasSubstr("global batch 6 is not divisible by dp 4 (dp_replicate 2 x dp_shard 2)"));
}

TEST(ParallelDims, ParseTakesKeyDegreeItems) {
  const ParallelDims d = ParallelDims::parse("tp=2,pp=2,dp_shard=3");
  EXPECT_EQ(d.tp, 2);
  EXPECT_EQ(d.pp, 2);
  EXPECT_EQ(d.dp_shard, 3);
  EXPECT_EQ(d.dp_replicate, 1);
  EXPECT_EQ(d.cp, 1);
  EXPECT_EQ(ParallelDims::parse("cp=2,dp_replicate=2").world_size(), 4);
  EXPECT_THAT(error_of([] { ParallelDims::parse("tp=2,fsdp=2"); }), testing::HasSubstr("unknown key 'fsdp'"));
  EXPECT_THAT(error_of([] { ParallelDims::parse("tp=x"); }), testing::HasSubstr("degree 'x' of tp is not an integer"));
  EXPECT_THAT(error_of([] { ParallelDims::parse("tp2"); }), testing::HasSubstr("item 'tp2' is not key=degree"));
  EXPECT_THAT(error_of([] { ParallelDims::parse("pp=0"); }), testing::HasSubstr("pp must be >= 1, got 0"));
}

TEST(ParallelDims, RankOrderIsTpFastestThenCpDpShardDpReplicatePp) {
  ParallelDims d{.dp_replicate = 2, .dp_shard = 2, .cp = 1, .tp = 2, .pp = 2};
  // The worked example of parallel_dims.h (there with dp_replicate 1): rank 5.
  ParallelDims e{.dp_replicate = 1, .dp_shard = 2, .cp = 1, .tp = 2, .pp = 2};
  Coords c = coords_of(e, 5);
  EXPECT_EQ(c.tp, 1);
  EXPECT_EQ(c.dp_shard, 0);
  EXPECT_EQ(c.pp, 1);
  Coords c9 = coords_of(d, 9);  // 9 = 1 + 2*(0 + 1*(0 + 2*(0 + 2*1)))
  EXPECT_EQ(c9.tp, 1);
  EXPECT_EQ(c9.dp_shard, 0);
  EXPECT_EQ(c9.dp_replicate, 0);
  EXPECT_EQ(c9.pp, 1);
  for (int r = 0; r < d.world_size(); ++r) EXPECT_EQ(rank_of(d, coords_of(d, r)), r);
}

TEST(ParallelDims, StageLayersGiveFirstAndLastAtMostOneFewer) {
  using text::stage_layers;
  EXPECT_EQ(stage_layers(8, 0, 4), (std::pair<int64_t, int64_t>{0, 2}));
  EXPECT_EQ(stage_layers(8, 3, 4), (std::pair<int64_t, int64_t>{6, 8}));
  // 7 layers on 4 stages: 2 2 2 1 ; 6 layers on 4 stages: 1 2 2 1.
  EXPECT_EQ(stage_layers(7, 3, 4), (std::pair<int64_t, int64_t>{6, 7}));
  EXPECT_EQ(stage_layers(6, 0, 4), (std::pair<int64_t, int64_t>{0, 1}));
  EXPECT_EQ(stage_layers(6, 1, 4), (std::pair<int64_t, int64_t>{1, 3}));
  EXPECT_EQ(stage_layers(6, 3, 4), (std::pair<int64_t, int64_t>{5, 6}));
}

TEST(Communicator, SingleRankCollectivesAreIdentities) {
  auto c = single_rank_communicator();
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3}, {3});
  c->all_reduce(t, ReduceOp::avg);
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  Tensor out = Tensor::zeros({3}, DType::f32);
  c->all_gather(t, out);
  EXPECT_EQ(out.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  EXPECT_EQ(c->split(0, 0, "tp")->size(), 1);
  EXPECT_THAT(error_of([&] { c->isend(t, 1, 0); }), testing::HasSubstr("isend to rank 1"));
  EXPECT_EQ(c->stats().bytes_sent, 0);
}

TEST(Communicator, SingleRankAsyncCollectivesAreCompleteOnReturn) {
  auto c = single_rank_communicator();
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {4});
  auto w = c->iall_reduce(t, ReduceOp::avg);
  EXPECT_TRUE(w->test());
  w->wait();
  w->wait();  // a second wait is harmless
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1, 2, 3, 4}));
  Tensor gathered = Tensor::zeros({4}, DType::f32), scattered = Tensor::zeros({4}, DType::f32);
  auto g = c->iall_gather(t, gathered);
  auto r = c->ireduce_scatter(t, scattered);
  EXPECT_TRUE(g->test() && r->test());
  g->wait();
  r->wait();
  EXPECT_EQ(gathered.to_vector<float>(), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(scattered.to_vector<float>(), (std::vector<float>{1, 2, 3, 4}));
  // Shapes are checked as in the blocking calls.
  Tensor small = Tensor::zeros({2}, DType::f32);
  EXPECT_THAT(error_of([&] { c->iall_gather(t, small); }), testing::HasSubstr("all_gather"));
  EXPECT_EQ(c->stats().bytes_sent, 0);
  EXPECT_EQ(c->stats().wait_s, 0.0);
}

TEST(ContextParallel, RankRHoldsChunksRAnd2cpMinus1MinusR) {
  // T 16, cp 2: four chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  EXPECT_EQ(cp_positions(16, 2, 0), (std::vector<int32_t>{0, 1, 2, 3, 12, 13, 14, 15}));
  EXPECT_EQ(cp_positions(16, 2, 1), (std::vector<int32_t>{4, 5, 6, 7, 8, 9, 10, 11}));
}
