#include "server/model/torchscript_model.h"

#include <torch/script.h>

#include <filesystem>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/model/torch_status.h"

namespace retrace::model {
namespace {

absl::Status CheckIsFile(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(absl::StrCat(
        "TorchScript model ", path, " does not exist or is not a file"));
  }
  return absl::OkStatus();
}

// torch::jit::load reports bad archives as c10::Error; all of those mean "not
// a usable TorchScript file", so they become INVALID_ARGUMENT.
absl::StatusOr<torch::jit::Module> LoadModule(const std::string& path) {
  absl::Status exists = CheckIsFile(path);
  if (!exists.ok()) return exists;
  absl::StatusOr<torch::jit::Module> module =
      internal::CallTorch(absl::StrCat("loading TorchScript model ", path),
                          [&]() -> absl::StatusOr<torch::jit::Module> {
                            return torch::jit::load(path, torch::kCPU);
                          });
  if (!module.ok()) {
    if (absl::IsResourceExhausted(module.status())) return module.status();
    return absl::InvalidArgumentError(module.status().message());
  }
  if (!module->find_method("forward").has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path, " has no forward method"));
  }
  return module;
}

}  // namespace

struct TorchScriptModel::Impl {
  torch::jit::Module module;
};

TorchScriptModel::TorchScriptModel(std::string path,
                                   const ImageShape& input_shape,
                                   std::unique_ptr<Impl> impl)
    : path_(std::move(path)),
      input_shape_(input_shape),
      impl_(std::move(impl)) {}

TorchScriptModel::~TorchScriptModel() = default;

absl::StatusOr<std::unique_ptr<TorchScriptModel>> TorchScriptModel::Create(
    const std::string& path, const ImageShape& input_shape) {
  absl::StatusOr<torch::jit::Module> module = LoadModule(path);
  if (!module.ok()) return module.status();
  auto impl = std::make_unique<Impl>();
  impl->module = *std::move(module);
  impl->module.eval();
  return std::unique_ptr<TorchScriptModel>(
      new TorchScriptModel(path, input_shape, std::move(impl)));
}

absl::StatusOr<at::Tensor> TorchScriptModel::Forward(const at::Tensor& x_t,
                                                     const at::Tensor& t) {
  if (!x_t.defined() || x_t.dim() != 4 || x_t.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path_,
                     ": x_t must be a float32 [B, C, H, W] tensor"));
  }
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != at::kLong ||
      t.size(0) != x_t.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path_, ": t must be int64 [", x_t.size(0), "]"));
  }
  absl::StatusOr<at::Tensor> eps = internal::CallTorch(
      absl::StrCat("TorchScript model ", path_, " forward"),
      [&]() -> absl::StatusOr<at::Tensor> {
        c10::IValue out = impl_->module.forward({x_t, t});
        if (!out.isTensor()) {
          return absl::InvalidArgumentError(
              absl::StrCat("TorchScript model ", path_, ": forward returned ",
                           out.tagKind(), ", expected a Tensor"));
        }
        return out.toTensor();
      });
  if (!eps.ok()) return eps.status();
  if (!eps->sizes().equals(x_t.sizes())) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path_, ": forward returned shape [",
                     absl::StrJoin(eps->sizes().vec(), ", "), "], expected [",
                     absl::StrJoin(x_t.sizes().vec(), ", "), "]"));
  }
  return eps;
}

std::vector<NamedParameter> TorchScriptModel::NamedParameters() const {
  std::vector<NamedParameter> out;
  for (const auto& item : impl_->module.named_parameters(/*recurse=*/true)) {
    out.push_back(NamedParameter{item.name, item.value});
  }
  return out;
}

void TorchScriptModel::SetTraining(bool training) {
  impl_->module.train(training);
}

absl::Status TorchScriptModel::Save(const std::string& path) const {
  return internal::CallTorch(absl::StrCat("saving TorchScript model to ", path),
                             [&]() -> absl::Status {
                               impl_->module.save(path);
                               return absl::OkStatus();
                             });
}

absl::Status TorchScriptModel::Load(const std::string& path) {
  absl::StatusOr<torch::jit::Module> other = LoadModule(path);
  if (!other.ok()) return other.status();
  std::map<std::string, at::Tensor> values;
  for (const auto& item : other->named_parameters(true)) {
    values.emplace(item.name, item.value);
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> staged;
  for (const auto& item : impl_->module.named_parameters(true)) {
    auto it = values.find(item.name);
    if (it == values.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TorchScript model ", path, " lacks parameter ", item.name));
    }
    if (!it->second.sizes().equals(item.value.sizes())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TorchScript model ", path, ": parameter ", item.name, " has shape [",
          absl::StrJoin(it->second.sizes().vec(), ", "), "], expected [",
          absl::StrJoin(item.value.sizes().vec(), ", "), "]"));
    }
    staged.emplace_back(item.value, it->second);
  }
  return internal::CallTorch(absl::StrCat("loading parameters from ", path),
                             [&]() -> absl::Status {
                               torch::NoGradGuard no_grad;
                               for (auto& [param, value] : staged)
                                 param.copy_(value);
                               return absl::OkStatus();
                             });
}

}  // namespace retrace::model
