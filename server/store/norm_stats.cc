#include "server/store/norm_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace retrace::store {

double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(values.begin(), values.end());
  const double position = q * double(values.size() - 1);
  const size_t lo = size_t(std::floor(position));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  const double fraction = position - double(lo);
  return values[lo] + fraction * (values[hi] - values[lo]);
}

nlohmann::json ComputeNormStats(const std::vector<float>& norms,
                                int64_t num_samples, int64_t num_checkpoints,
                                int64_t num_slots) {
  using nlohmann::json;
  json mean = json::array(), median = json::array(), p95 = json::array();
  std::vector<double> column(size_t(num_samples > 0 ? num_samples : 0));
  const int64_t row = num_checkpoints * num_slots;
  for (int64_t c = 0; c < num_checkpoints; ++c) {
    json mean_c = json::array(), median_c = json::array(),
         p95_c = json::array();
    for (int64_t s = 0; s < num_slots; ++s) {
      if (num_samples == 0) {
        mean_c.push_back(nullptr);
        median_c.push_back(nullptr);
        p95_c.push_back(nullptr);
        continue;
      }
      double sum = 0;
      for (int64_t n = 0; n < num_samples; ++n) {
        column[size_t(n)] = norms[size_t(n * row + c * num_slots + s)];
        sum += column[size_t(n)];
      }
      mean_c.push_back(sum / double(num_samples));
      median_c.push_back(Quantile(column, 0.5));
      p95_c.push_back(Quantile(column, 0.95));
    }
    mean.push_back(std::move(mean_c));
    median.push_back(std::move(median_c));
    p95.push_back(std::move(p95_c));
  }
  return {{"num_samples", num_samples},
          {"mean", std::move(mean)},
          {"median", std::move(median)},
          {"p95", std::move(p95)}};
}

}  // namespace retrace::store
