// A small RGB raster for charts: pixels, lines, rectangles, text in a built-in 5x7 bitmap
// font (ASCII 32-126, scaled by an integer factor), and a PNG encoder (8-bit RGB, zlib
// deflate, CRC-32 per chunk). No plotting library exists for C++ on the target machines.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llama3::plot {

struct Color {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Color&) const = default;
};

class Image {
 public:
  Image(int width, int height, Color background = {255, 255, 255});
  int width() const { return w_; }
  int height() const { return h_; }
  Color at(int x, int y) const;
  void set(int x, int y, Color c);                          // ignores pixels outside the image
  void fill_rect(int x0, int y0, int x1, int y1, Color c);  // inclusive corners
  // A line of the given thickness (pixels) from (x0,y0) to (x1,y1).
  void line(double x0, double y0, double x1, double y1, Color c, int thickness = 1);
  // Text with its top-left corner at (x, y); each font pixel becomes scale x scale.
  void text(int x, int y, std::string_view s, Color c, int scale = 1);
  // Text rotated 90 degrees counter-clockwise (for a y-axis label), bottom-left at (x, y).
  void text_vertical(int x, int y, std::string_view s, Color c, int scale = 1);
  const std::vector<uint8_t>& rgb() const { return px_; }

 private:
  int w_, h_;
  std::vector<uint8_t> px_;  // row-major RGB
};

// Size of rendered text in pixels.
constexpr int kGlyphW = 5, kGlyphH = 7, kGlyphAdvance = 6;
inline int text_width(std::string_view s, int scale = 1) {
  return int(s.size()) * kGlyphAdvance * scale;
}

// PNG bytes of an image, and writing them to a file (errors name the path).
std::string encode_png(const Image& img);
void write_png(const std::string& path, const Image& img);

}  // namespace llama3::plot
