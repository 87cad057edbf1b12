// TensorBoard event files written without TensorFlow: TFRecord framing (length, masked
// CRC32C of the length, payload, masked CRC32C of the payload) around hand-encoded
// `tensorflow.Event` protobufs. Only what scalar logging needs is encoded:
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
#pragma once

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llama3::log {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// TFRecord's masked CRC: rotate right by 15 bits and add 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t n);

// The serialised Event protos (exposed for tests).
std::string encode_file_version_event(double wall_time, std::string_view version = "brain.Event:2");
std::string encode_scalars_event(double wall_time, int64_t step,
                                 std::span<const std::pair<std::string, float>> scalars);
// One TFRecord: the framing around a payload.
std::string tfrecord(std::string_view payload);

// Appends scalar events to dir/events.out.tfevents.<unix time>.<host>; the directory is
// created. Each record is flushed as written, so a killed run keeps what it logged.
class EventWriter {
 public:
  explicit EventWriter(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  void scalars(int64_t step, std::span<const std::pair<std::string, float>> values,
               double wall_time);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write(const std::string& record);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace llama3::log
