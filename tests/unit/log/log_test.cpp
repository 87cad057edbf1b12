// Observability building blocks: CRC32C and TFRecord framing, the Event protobuf bytes,
// metrics.jsonl writing and reading (last value per step, torn last line), the PNG encoder,
// chart ticks and the progress line's text.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "runtime/core/error.h"
#include "runtime/log/metrics.h"
#include "runtime/log/progress.h"
#include "runtime/log/tfevents.h"
#include "runtime/plot/chart.h"
#include "runtime/plot/image.h"

namespace fs = std::filesystem;
using namespace llama3;

namespace {
fs::path temp_dir(const std::string& name) {
  fs::path p =
      fs::temp_directory_path() / ("llama3_log_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
uint32_t le32(const std::string& s, size_t at) {
  uint32_t v;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}
}  // namespace

TEST(Crc32c, MatchesTheStandardCheckValues) {
  // RFC 3720 / iSCSI check value of "123456789", and 32 zero bytes (RFC 3720 B.4).
  EXPECT_EQ(log::crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(log::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  const std::string ones(32, '\xff');
  EXPECT_EQ(log::crc32c(ones.data(), ones.size()), 0x62A8AB43u);
}

TEST(Crc32c, MaskRotatesAndAddsTheTfRecordConstant) {
  const uint32_t c = log::crc32c("abc", 3);
  EXPECT_EQ(log::masked_crc32c("abc", 3), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TfRecord, FramesLengthPayloadAndBothCrcs) {
  const std::string r = log::tfrecord("hello");
  ASSERT_EQ(r.size(), 8u + 4 + 5 + 4);
  uint64_t len;
  std::memcpy(&len, r.data(), 8);
  EXPECT_EQ(len, 5u);
  EXPECT_EQ(le32(r, 8), log::masked_crc32c(r.data(), 8));
  EXPECT_EQ(r.substr(12, 5), "hello");
  EXPECT_EQ(le32(r, 17), log::masked_crc32c("hello", 5));
}

TEST(EventProto, ScalarEventHasTheExpectedWireBytes) {
  const std::vector<std::pair<std::string, float>> v = {{"loss", 2.5f}};
  const std::string e = log::encode_scalars_event(1.0, 300, v);
  std::string want;
  want += '\x09';  // field 1, fixed64: wall_time
  double one = 1.0;
  want.append(reinterpret_cast<const char*>(&one), 8);
  want += "\x10\xac\x02";  // field 2, varint 300
  want += "\x2a\x0d";      // field 5 (summary), 13 bytes
  want += "\x0a\x0b";      // Summary.value, 11 bytes
  want += "\x0a\x04loss";  // Value.tag
  want += '\x15';          // Value.simple_value, fixed32
  float f = 2.5f;
  want.append(reinterpret_cast<const char*>(&f), 4);
  EXPECT_EQ(e, want);
  const std::string fv = log::encode_file_version_event(0.0);
  EXPECT_NE(fv.find("\x1a\x0d"
                    "brain.Event:2"),
            std::string::npos);
}

TEST(MetricsWriter, AppendsLinesAndReadersTakeTheLastValuePerStep) {
  const fs::path d = temp_dir("append");
  {
    log::MetricsWriter w(d.string(), "pretrain");
    w.log(1, {{"loss", 5.0}, {"lr", 1e-3}});
    w.log(2, {{"loss", 4.0}});
  }
  {  // a resumed run redoes step 2 and goes on
    log::MetricsWriter w(d.string(), "pretrain");
    w.log(2, {{"loss", 3.5}});
    w.log(3, {{"loss", 3.0}, {"eval_loss", 3.2}});
  }
  std::ofstream(d / "metrics.jsonl", std::ios::app)
      << "{\"stage\":\"pretrain\",\"step\":4,\"lo";  // killed mid-line
  const auto s = log::read_metrics_jsonl((d / "metrics.jsonl").string());
  const log::Series want_loss = {{1, 5.0}, {2, 3.5}, {3, 3.0}};
  EXPECT_EQ(s.at("loss"), want_loss);
  EXPECT_EQ(s.at("eval_loss"), (log::Series{{3, 3.2}}));
  EXPECT_EQ(s.at("lr"), (log::Series{{1, 1e-3}}));
  EXPECT_EQ(s.count("stage"), 0u);
  {  // the next writer cuts the torn line off before appending
    log::MetricsWriter w(d.string(), "pretrain", {.tensorboard = false});
    w.log(4, {{"loss", 2.5}});
  }
  EXPECT_EQ(log::read_metrics_jsonl((d / "metrics.jsonl").string()).at("loss").back(),
            (std::pair<int64_t, double>{4, 2.5}));
  int tb_files = 0;
  for (const auto& e : fs::directory_iterator(d / "tb"))
    tb_files += e.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  EXPECT_EQ(tb_files, 2);  // one per writer: a restart never appends to another run's file
  fs::remove_all(d);
}

TEST(MetricsReader, AnInvalidMiddleLineNamesFileAndLine) {
  const fs::path d = temp_dir("bad");
  std::ofstream(d / "metrics.jsonl")
      << "{\"step\":1,\"loss\":2}\nnot json\n{\"step\":2,\"loss\":1}\n";
  try {
    log::read_metrics_jsonl((d / "metrics.jsonl").string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.jsonl:2"), std::string::npos) << e.what();
  }
  fs::remove_all(d);
}

TEST(ReadRun, FinishedStagesInOrderThenStagesInProgressWithFinalFallback) {
  const fs::path d = temp_dir("run");
  std::ofstream(d / "state.json") << R"({"finished": ["pretrain", "anneal"]})";
  for (const char* s : {"pretrain", "anneal", "sft"}) {
    log::MetricsWriter w((d / s).string(), s, {.tensorboard = false});
    w.log(10, {{"loss", 2.0}});
  }
  std::ofstream(d / "anneal" / "final.json") << R"({"eval_loss": 1.5})";
  const auto stages = log::read_run(d.string());
  ASSERT_EQ(stages.size(), 3u);
  EXPECT_EQ(stages[0].name, "pretrain");
  EXPECT_EQ(stages[1].name, "anneal");
  EXPECT_EQ(stages[2].name, "sft");
  EXPECT_TRUE(stages[1].finished);
  EXPECT_FALSE(stages[2].finished);
  EXPECT_TRUE(stages[1].final_from_json);
  EXPECT_EQ(stages[1].final.at("eval_loss"), 1.5);
  EXPECT_FALSE(stages[0].final_from_json);
  EXPECT_EQ(stages[0].final.at("loss"), 2.0);
  fs::remove_all(d);
}

TEST(Png, EncodesRgbRowsThatZlibDecodesBack) {
  plot::Image img(3, 2, {255, 255, 255});
  img.set(1, 0, {10, 20, 30});
  const std::string png = plot::encode_png(img);
  ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  // IDAT follows the 25-byte IHDR chunk.
  const size_t idat = 8 + 25;
  const uint32_t len = uint32_t(uint8_t(png[idat])) << 24 | uint32_t(uint8_t(png[idat + 1])) << 16 |
                       uint32_t(uint8_t(png[idat + 2])) << 8 | uint8_t(png[idat + 3]);
  EXPECT_EQ(png.substr(idat + 4, 4), "IDAT");
  std::string raw(2 * (1 + 9), '\0');
  uLongf n = raw.size();
  ASSERT_EQ(uncompress(reinterpret_cast<Bytef*>(raw.data()), &n,
                       reinterpret_cast<const Bytef*>(png.data() + idat + 8), len),
            Z_OK);
  ASSERT_EQ(n, raw.size());
  EXPECT_EQ(raw[0], 0);  // filter none
  EXPECT_EQ(uint8_t(raw[1 + 3]), 10);
  EXPECT_EQ(uint8_t(raw[1 + 5]), 30);
  EXPECT_EQ(uint8_t(raw[1 + 0]), 255);
  // Every chunk's CRC covers type + data.
  const uint32_t crc =
      uint32_t(crc32(0, reinterpret_cast<const Bytef*>(png.data() + idat + 4), len + 4));
  const size_t at = idat + 8 + len;
  const uint32_t got = uint32_t(uint8_t(png[at])) << 24 | uint32_t(uint8_t(png[at + 1])) << 16 |
                       uint32_t(uint8_t(png[at + 2])) << 8 | uint8_t(png[at + 3]);
  EXPECT_EQ(got, crc);
  EXPECT_EQ(png.substr(png.size() - 8, 4), "IEND");
}

TEST(Chart, TicksAreRoundAndLabelsCompact) {
  EXPECT_EQ(plot::nice_ticks(0.0, 1.0, 5),
            (std::vector<double>{0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0}));
  const auto t = plot::nice_ticks(2.31, 7.9, 6);
  EXPECT_DOUBLE_EQ(t.front(), 3.0);
  EXPECT_DOUBLE_EQ(t.back(), 7.0);
  EXPECT_EQ(plot::tick_label(1500), "1500");
  EXPECT_EQ(plot::tick_label(0.6000000000000001), "0.6");
  EXPECT_EQ(plot::tick_label(2e12), "2e12");
  EXPECT_EQ(plot::tick_label(1.5e-5), "1.5e-5");
  EXPECT_EQ(plot::tick_label(0), "0");
}

TEST(Chart, RendersSeriesInTheirPaletteColour) {
  plot::Chart c;
  c.width = 300, c.height = 200;
  plot::Series s;
  s.x = {0, 1};
  s.y = {0, 1};
  c.series.push_back(s);
  const plot::Image img = plot::render(c);
  int coloured = 0;
  for (int y = 0; y < img.height(); ++y)
    for (int x = 0; x < img.width(); ++x) coloured += img.at(x, y) == plot::palette(0);
  EXPECT_GT(coloured, 100);
}

TEST(ProgressLine, ShowsStageStepLossThroughputPeakAndEta) {
  log::ProgressOptions o;
  o.stage = "pretrain";
  o.total_steps = 100;
  o.peak_flops = 1e11;
  o.tty = 0;
  o.plain_interval_s = 1e9;
  log::ProgressLine p(o);
  p.update({.step = 10,
            .loss = 3.25,
            .lr = 1e-3,
            .tokens_per_s = 2048,
            .flops_per_s = 2.5e10,
            .step_seconds = 2});
  EXPECT_EQ(
      p.format({.step = 10, .loss = 3.25, .lr = 1e-3, .tokens_per_s = 2048, .flops_per_s = 2.5e10}),
      "pretrain  step 10/100  loss 3.2500  lr 1.00e-03  2048 tok/s  25.0% GEMM peak  ETA 3m00s");
  EXPECT_EQ(log::format_eta(3725), "1h02m");
  EXPECT_EQ(log::format_eta(-1), "?");
}
