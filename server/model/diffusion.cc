#include "server/model/diffusion.h"

#include <ATen/ATen.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/model/torch_status.h"

namespace retrace::model {
namespace {

std::string ShapeString(const at::Tensor& tensor) {
  std::string out = "[";
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    absl::StrAppend(&out, d == 0 ? "" : ", ", tensor.size(d));
  }
  return out + "]";
}

absl::Status CheckFloatBatch(const at::Tensor& tensor, absl::string_view what) {
  if (!tensor.defined() || tensor.dim() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be a tensor of rank >= 1"));
  }
  if (tensor.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " must be float32, got ", c10::toString(tensor.scalar_type())));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status DiffusionModel::To(const c10::Device& device) {
  if (device.is_cpu() && this->device().is_cpu()) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(
      "model ", Architecture(), " cannot move to device ", device.str()));
}

c10::Device DiffusionModel::device() const {
  const std::vector<NamedParameter> params = NamedParameters();
  return params.empty() ? c10::Device(c10::kCPU)
                        : params.front().tensor.device();
}

int64_t CountParameters(const DiffusionModel& model) {
  int64_t total = 0;
  for (const NamedParameter& p : model.NamedParameters()) {
    total += p.tensor.numel();
  }
  return total;
}

at::Tensor AlphaBarTensor(const NoiseSchedule& schedule) {
  const std::vector<double>& values = schedule.alpha_bars();
  return at::tensor(at::ArrayRef<double>(values.data(), values.size()),
                    at::TensorOptions().dtype(at::kDouble))
      .to(at::kFloat);
}

absl::StatusOr<at::Tensor> AddNoise(const NoiseSchedule& schedule,
                                    const at::Tensor& x, const at::Tensor& t,
                                    const at::Tensor& eps) {
  RETURN_IF_ERROR(CheckFloatBatch(x, "AddNoise: x"));
  RETURN_IF_ERROR(CheckFloatBatch(eps, "AddNoise: eps"));
  if (!eps.sizes().equals(x.sizes())) {
    return absl::InvalidArgumentError(
        absl::StrCat("AddNoise: eps shape ", ShapeString(eps),
                     " differs from x shape ", ShapeString(x)));
  }
  if (!t.defined() || t.dim() != 1 || t.size(0) != x.size(0) ||
      t.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError(
        absl::StrCat("AddNoise: t must be int64 [", x.size(0), "], got ",
                     t.defined() ? ShapeString(t) : "undefined"));
  }
  return internal::CallTorch("AddNoise", [&]() -> absl::StatusOr<at::Tensor> {
    if (t.numel() > 0) {
      const int64_t lo = t.min().item<int64_t>();
      const int64_t hi = t.max().item<int64_t>();
      if (lo < 0 || hi >= schedule.num_timesteps()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "AddNoise: timesteps must lie in [0, ", schedule.num_timesteps(),
            "), got range [", lo, ", ", hi, "]"));
      }
    }
    // Scales are gathered in double and rounded once, so x_t matches the
    // double-precision formula to float rounding.
    const std::vector<double>& alpha_bars = schedule.alpha_bars();
    at::Tensor table =
        at::tensor(at::ArrayRef<double>(alpha_bars.data(), alpha_bars.size()),
                   at::TensorOptions().dtype(at::kDouble));
    at::Tensor abar = table.index_select(0, t.to(at::kCPU));
    std::vector<int64_t> view(x.dim(), 1);
    view[0] = x.size(0);
    at::Tensor signal = abar.sqrt().to(at::kFloat).view(view).to(x.device());
    at::Tensor noise =
        (1.0 - abar).sqrt().to(at::kFloat).view(view).to(x.device());
    return signal * x + noise * eps;
  });
}

absl::StatusOr<at::Tensor> PerExampleLoss(const at::Tensor& eps,
                                          const at::Tensor& eps_hat,
                                          LossType loss) {
  RETURN_IF_ERROR(CheckFloatBatch(eps, "loss: eps"));
  RETURN_IF_ERROR(CheckFloatBatch(eps_hat, "loss: eps_hat"));
  if (!eps.sizes().equals(eps_hat.sizes())) {
    return absl::InvalidArgumentError(
        absl::StrCat("loss: eps shape ", ShapeString(eps),
                     " differs from eps_hat shape ", ShapeString(eps_hat)));
  }
  return internal::CallTorch("loss", [&]() -> absl::StatusOr<at::Tensor> {
    at::Tensor diff = (eps - eps_hat).reshape({eps.size(0), -1});
    at::Tensor per_value = loss == LossType::kL1 ? diff.abs() : diff * diff;
    return per_value.mean(/*dim=*/1);
  });
}

absl::StatusOr<at::Tensor> DiffusionLoss(DiffusionModel& model,
                                         const NoiseSchedule& schedule,
                                         LossType loss, const at::Tensor& x,
                                         const at::Tensor& t,
                                         const at::Tensor& eps) {
  ASSIGN_OR_RETURN(at::Tensor x_t, AddNoise(schedule, x, t, eps));
  ASSIGN_OR_RETURN(at::Tensor eps_hat, model.Forward(x_t, t));
  return PerExampleLoss(eps, eps_hat, loss);
}

}  // namespace retrace::model
