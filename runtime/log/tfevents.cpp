#include "runtime/log/tfevents.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "runtime/core/error.h"

namespace llama3::log {

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr auto kCrc32cTable = make_crc32c_table();

// Protobuf wire format: varint, tag = (field << 3) | wire type.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char(uint8_t(v) | 0x80));
    v >>= 7;
  }
  out.push_back(char(uint8_t(v)));
}
void put_tag(std::string& out, int field, int wire) {
  put_varint(out, uint64_t(field) << 3 | uint64_t(wire));
}
void put_bytes(std::string& out, int field, std::string_view s) {
  put_tag(out, field, 2);
  put_varint(out, s.size());
  out.append(s);
}
template <typename T>
void put_fixed(std::string& out, int field, T v) {  // little-endian fixed32/fixed64
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  put_tag(out, field, sizeof(T) == 8 ? 1 : 5);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // x86/ARM little-endian hosts
  out.append(b, sizeof(T));
}
void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(char(uint8_t(v >> (8 * i))));
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrc32cTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string encode_file_version_event(double wall_time, std::string_view version) {
  std::string e;
  put_fixed(e, 1, wall_time);
  put_bytes(e, 3, version);
  return e;
}

std::string encode_scalars_event(double wall_time, int64_t step,
                                 std::span<const std::pair<std::string, float>> scalars) {
  std::string summary;
  for (const auto& [tag, v] : scalars) {
    std::string value;
    put_bytes(value, 1, tag);
    put_fixed(value, 2, v);
    put_bytes(summary, 1, value);
  }
  std::string e;
  put_fixed(e, 1, wall_time);
  put_tag(e, 2, 0);
  put_varint(e, uint64_t(step));  // int64: two's complement varint
  put_bytes(e, 5, summary);
  return e;
}

std::string tfrecord(std::string_view payload) {
  std::string r;
  put_le(r, payload.size(), 8);
  put_le(r, masked_crc32c(r.data(), 8), 4);
  r.append(payload);
  put_le(r, masked_crc32c(payload.data(), payload.size()), 4);
  return r;
}

EventWriter::EventWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const auto now = std::chrono::system_clock::now();
  const double t = std::chrono::duration<double>(now.time_since_epoch()).count();
  // A restart within the same second must not append to the other run's file.
  std::string base = fmt::format("{}/events.out.tfevents.{}.{}", dir, int64_t(t), host);
  path_ = base;
  for (int i = 1; std::filesystem::exists(path_); ++i) path_ = fmt::format("{}.{}", base, i);
  f_ = std::fopen(path_.c_str(), "wb");
  LLAMA3_CHECK(f_, "cannot create TensorBoard event file {}: {}", path_, std::strerror(errno));
  write(tfrecord(encode_file_version_event(t)));
}

EventWriter::~EventWriter() {
  if (f_) std::fclose(f_);
}

void EventWriter::write(const std::string& record) {
  LLAMA3_CHECK(std::fwrite(record.data(), 1, record.size(), f_) == record.size(),
               "{}: write failed: {}", path_, std::strerror(errno));
  std::fflush(f_);
}

void EventWriter::scalars(int64_t step, std::span<const std::pair<std::string, float>> values,
                          double wall_time) {
  if (values.empty()) return;
  write(tfrecord(encode_scalars_event(wall_time, step, values)));
}

void EventWriter::flush() {
  std::fflush(f_);
}

}  // namespace llama3::log
