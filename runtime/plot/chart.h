// Line charts rendered into an Image: axes with "nice" ticks (1/2/5 x 10^k, or decades on
// a log axis), numeric tick labels, title, axis labels, a legend, series drawn as lines
// and/or point markers, and highlighted points (e.g. the minimum of an IsoFLOPs curve).
#pragma once

#include <string>
#include <vector>

#include "runtime/plot/image.h"

namespace llama3::plot {

struct Series {
  std::string name;          // legend entry; empty: not in the legend
  std::vector<double> x, y;  // same length; non-finite points are skipped
  bool lines = true;
  bool markers = false;
  bool dashed = false;
  int color = -1;  // palette index; -1: the series' position
};

struct Chart {
  std::string title, xlabel, ylabel;
  bool log_x = false, log_y = false;
  int width = 900, height = 560;
  std::vector<Series> series;
  std::vector<Series> highlights;  // drawn last, as large markers
};

Color palette(int i);

Image render(const Chart& c);

// Ticks covering [lo, hi]: about `target` round values (exposed for tests).
std::vector<double> nice_ticks(double lo, double hi, int target = 6);
// A compact label: 3 significant digits, e.g. 0.00123 -> "1.23e-3", 1500 -> "1500", 2e12 -> "2e12".
std::string tick_label(double v);

}  // namespace llama3::plot
