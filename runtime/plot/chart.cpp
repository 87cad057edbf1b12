#include "runtime/plot/chart.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace llama3::plot {

namespace {
constexpr Color kBlack{0, 0, 0}, kGrid{225, 225, 225}, kAxis{60, 60, 60};
constexpr int kScale = 2;  // font scale: 10x14 pixel glyphs

double tx(double v, bool log) {
  return log ? (v > 0 ? std::log10(v) : std::numeric_limits<double>::quiet_NaN()) : v;
}

void marker(Image& img, int x, int y, Color c, int r) {
  for (int dy = -r; dy <= r; ++dy)
    for (int dx = -r; dx <= r; ++dx)
      if (dx * dx + dy * dy <= r * r + r) img.set(x + dx, y + dy, c);
}
}  // namespace

Color palette(int i) {
  static constexpr Color k[] = {{31, 119, 180},  {255, 127, 14}, {44, 160, 44},   {214, 39, 40},
                                {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                                {188, 189, 34},  {23, 190, 207}};
  return k[((i % 10) + 10) % 10];
}

std::string tick_label(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e-3 && a < 1e5) return fmt::format("{:.5g}", v);
  const int e = int(std::floor(std::log10(a)));
  double m = v / std::pow(10.0, e);
  if (std::abs(std::abs(m) - 10.0) < 1e-9) m /= 10, m = std::round(m * 100) / 100;
  std::string ms = fmt::format("{:.3g}", m);
  return fmt::format("{}e{}", ms, e);
}

std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    t.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

Image render(const Chart& c) {
  Image img(c.width, c.height);
  const int gh = kGlyphH * kScale;
  const int left = 20 + gh + 12 + text_width("-0.000", kScale), right = 24;
  const int top = 16 + gh + 12, bottom = 18 + 2 * gh + 18;
  const int pw = c.width - left - right, ph = c.height - top - bottom;

  // Data range in transformed coordinates.
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  auto scan = [&](const std::vector<Series>& ss) {
    for (const auto& s : ss)
      for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
        const double a = tx(s.x[i], c.log_x), b = tx(s.y[i], c.log_y);
        if (!std::isfinite(a) || !std::isfinite(b)) continue;
        x0 = std::min(x0, a), x1 = std::max(x1, a), y0 = std::min(y0, b), y1 = std::max(y1, b);
      }
  };
  scan(c.series);
  scan(c.highlights);
  if (!std::isfinite(x0)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 - x0 < 1e-12 * std::max(1.0, std::abs(x0))) x0 -= 0.5, x1 += 0.5;
  if (y1 - y0 < 1e-12 * std::max(1.0, std::abs(y0))) y0 -= 0.5, y1 += 0.5;
  {  // margins
    const double mx = (x1 - x0) * 0.03, my = (y1 - y0) * 0.06;
    x0 -= mx, x1 += mx, y0 -= my, y1 += my;
  }
  auto px = [&](double v) { return left + (v - x0) / (x1 - x0) * pw; };
  auto py = [&](double v) { return top + ph - (v - y0) / (y1 - y0) * ph; };

  // Ticks: decades on a log axis spanning >= 1 decade, else round values.
  auto ticks = [](double lo, double hi, bool log, int target) {
    std::vector<std::pair<double, std::string>> out;  // (transformed position, label)
    if (log && hi - lo >= 1.0) {
      const double st = std::max(1.0, std::ceil((hi - lo) / target));
      for (double e = std::ceil(lo); e <= hi; e += st)
        out.emplace_back(e, tick_label(std::pow(10.0, e)));
    } else if (log) {
      for (double v : nice_ticks(std::pow(10.0, lo), std::pow(10.0, hi), target))
        if (v > 0) out.emplace_back(std::log10(v), tick_label(v));
    } else {
      for (double v : nice_ticks(lo, hi, target)) out.emplace_back(v, tick_label(v));
    }
    return out;
  };
  const int xt_target = std::max(2, pw / 110);
  for (const auto& [v, label] : ticks(x0, x1, c.log_x, xt_target)) {
    const double x = px(v);
    img.line(x, top, x, top + ph, kGrid);
    img.line(x, top + ph, x, top + ph + 5, kAxis);
    img.text(int(x) - text_width(label, kScale) / 2, top + ph + 9, label, kBlack, kScale);
  }
  for (const auto& [v, label] : ticks(y0, y1, c.log_y, std::max(2, ph / 70))) {
    const double y = py(v);
    img.line(left, y, left + pw, y, kGrid);
    img.line(left - 5, y, left, y, kAxis);
    img.text(left - 9 - text_width(label, kScale), int(y) - gh / 2, label, kBlack, kScale);
  }
  img.line(left, top, left, top + ph, kAxis);
  img.line(left, top + ph, left + pw, top + ph, kAxis);
  img.line(left + pw, top, left + pw, top + ph, kAxis);
  img.line(left, top, left + pw, top, kAxis);

  img.text((c.width - text_width(c.title, kScale)) / 2, 14, c.title, kBlack, kScale);
  std::string xl = c.xlabel + (c.log_x ? " (log)" : "");
  img.text(left + (pw - text_width(xl, kScale)) / 2, c.height - gh - 12, xl, kBlack, kScale);
  std::string yl = c.ylabel + (c.log_y ? " (log)" : "");
  img.text_vertical(14, top + (ph + text_width(yl, kScale)) / 2, yl, kBlack, kScale);

  // Series, clipped to the plot area by drawing into it only.
  auto inside = [&](double x, double y) {
    return x >= left - 1 && x <= left + pw + 1 && y >= top - 1 && y <= top + ph + 1;
  };
  auto draw = [&](const Series& s, int idx, bool highlight) {
    const Color col = palette(s.color >= 0 ? s.color : idx);
    double lx = NAN, ly = NAN;
    double dash_len = 0;
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      const double a = tx(s.x[i], c.log_x), b = tx(s.y[i], c.log_y);
      if (!std::isfinite(a) || !std::isfinite(b)) {
        lx = ly = NAN;
        continue;
      }
      const double X = px(a), Y = py(b);
      if (s.lines && std::isfinite(lx) && inside(X, Y) && inside(lx, ly)) {
        if (!s.dashed) {
          img.line(lx, ly, X, Y, col, 2);
        } else {  // 9 pixels on, 7 off, continued across segments
          const double seg = std::hypot(X - lx, Y - ly);
          for (double t = 0; t < seg; t += 1.0, dash_len += 1.0)
            if (std::fmod(dash_len, 16.0) < 9.0) {
              const double a0 = t / seg, a1 = std::min(1.0, (t + 1.0) / seg);
              img.line(lx + a0 * (X - lx), ly + a0 * (Y - ly), lx + a1 * (X - lx),
                       ly + a1 * (Y - ly), col, 2);
            }
        }
      }
      if ((s.markers || highlight) && inside(X, Y)) {
        if (highlight) marker(img, int(std::lround(X)), int(std::lround(Y)), kBlack, 7);
        marker(img, int(std::lround(X)), int(std::lround(Y)), col, highlight ? 5 : 3);
      }
      lx = X, ly = Y;
    }
  };
  for (size_t i = 0; i < c.series.size(); ++i) draw(c.series[i], int(i), false);
  for (size_t i = 0; i < c.highlights.size(); ++i) draw(c.highlights[i], int(i), true);

  // Legend: top-right box.
  std::vector<std::pair<std::string, Color>> entries;
  for (size_t i = 0; i < c.series.size(); ++i)
    if (!c.series[i].name.empty())
      entries.emplace_back(c.series[i].name,
                           palette(c.series[i].color >= 0 ? c.series[i].color : int(i)));
  if (!entries.empty()) {
    int wmax = 0;
    for (const auto& e : entries) wmax = std::max(wmax, text_width(e.first, kScale));
    const int lh = gh + 6, bw = wmax + 44, bh = int(entries.size()) * lh + 8;
    // The corner whose box covers the fewest data points.
    int bx = left + pw - bw - 8, by = top + 8;
    long best = -1;
    for (const auto& [cx, cy] :
         {std::pair{left + pw - bw - 8, top + 8}, std::pair{left + 8, top + 8},
          std::pair{left + pw - bw - 8, top + ph - bh - 8},
          std::pair{left + 8, top + ph - bh - 8}}) {
      long n = 0;
      for (const auto* ss : {&c.series, &c.highlights})
        for (const auto& s : *ss)
          for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
            const double X = px(tx(s.x[i], c.log_x)), Y = py(tx(s.y[i], c.log_y));
            n += X >= cx - 6 && X <= cx + bw + 6 && Y >= cy - 6 && Y <= cy + bh + 6;
          }
      if (best < 0 || n < best) best = n, bx = cx, by = cy;
    }
    img.fill_rect(bx, by, bx + bw, by + bh, {255, 255, 255});
    img.line(bx, by, bx + bw, by, kAxis), img.line(bx, by + bh, bx + bw, by + bh, kAxis);
    img.line(bx, by, bx, by + bh, kAxis), img.line(bx + bw, by, bx + bw, by + bh, kAxis);
    for (size_t i = 0; i < entries.size(); ++i) {
      const int y = by + 6 + int(i) * lh;
      img.line(bx + 6, y + gh / 2, bx + 30, y + gh / 2, entries[i].second, 3);
      img.text(bx + 36, y, entries[i].first, kBlack, kScale);
    }
  }
  return img;
}

}  // namespace llama3::plot
