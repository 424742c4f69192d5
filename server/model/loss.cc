#include "server/model/loss.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace retrace::model {

absl::string_view LossTypeName(LossType type) {
  switch (type) {
    case LossType::kMse:
      return "mse";
    case LossType::kL1:
      return "l1";
  }
  return "unknown";
}

absl::StatusOr<LossType> ParseLossType(absl::string_view name) {
  if (name == "mse") return LossType::kMse;
  if (name == "l1") return LossType::kL1;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown loss '", name, "' (expected 'mse' or 'l1')"));
}

int LossPower(LossType type) { return type == LossType::kL1 ? 1 : 2; }

absl::StatusOr<double> PerExampleLossReference(absl::Span<const float> eps,
                                               absl::Span<const float> eps_hat,
                                               LossType type) {
  if (eps.empty() || eps.size() != eps_hat.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("loss: eps has ", eps.size(), " values, eps_hat has ",
                     eps_hat.size(), " (need equal, non-zero sizes)"));
  }
  double sum = 0.0;
  for (size_t i = 0; i < eps.size(); ++i) {
    const double d = static_cast<double>(eps[i]) - eps_hat[i];
    sum += type == LossType::kL1 ? std::abs(d) : d * d;
  }
  return sum / static_cast<double>(eps.size());
}

}  // namespace retrace::model
