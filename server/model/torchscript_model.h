// A user's noise-prediction network exported as TorchScript
// (torch.jit.script / torch.jit.trace, then .save()). The module's forward must
// be `forward(x_t: Tensor[B,C,H,W] float32, t: Tensor[B] int64) -> Tensor`
// returning eps of the same shape as x_t. NamedParameters are the module's
// named_parameters() in the order Python's Module.named_parameters() lists
// them, names dotted the same way.
//
// Forward runs the module with the graph executor's optimizations off (for
// this call's thread only): the optimized plan, which the executor switches
// to after a profiling run, rounds differently in the last bits, so the
// first call and later calls would not agree bit for bit. Without them every
// call gives the same bits, on every replica.
#ifndef RETRACE_SERVER_MODEL_TORCHSCRIPT_MODEL_H_
#define RETRACE_SERVER_MODEL_TORCHSCRIPT_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/diffusion_model.h"

namespace retrace::model {

inline constexpr char kTorchScriptArchitecture[] = "torchscript";

class TorchScriptModel final : public DiffusionModel {
 public:
  // Loads the module from `path` onto the CPU and checks, before the first
  // request, that retrace can use it. `input_shape` is what callers feed the
  // model (TorchScript does not record it). Errors name the file:
  //   NOT_FOUND         the file does not exist.
  //   INVALID_ARGUMENT  the file is not a zip archive, holds no TorchScript
  //                     code (a torch.save file), or its file-format version
  //                     lies outside what the linked LibTorch reads (the
  //                     message gives the version, the range and the LibTorch
  //                     version; docs/models.md, "Versions"), or
  //                     torch::jit::load fails;
  //                     forward is missing or its schema is not
  //                     forward(Tensor x_t, Tensor t) -> Tensor (further
  //                     arguments only with defaults; the message quotes the
  //                     schema found);
  //                     a forward pass without autograd on zeros
  //                     [1, C, H, W] of `input_shape` with t = [0] throws or
  //                     returns another shape (the message names the image
  //                     shape and the shapes or the model's error).
  //   RESOURCE_EXHAUSTED  out of memory while loading or probing.
  static absl::StatusOr<std::unique_ptr<TorchScriptModel>> Create(
      const std::string& path, const ImageShape& input_shape = ImageShape{});
  ~TorchScriptModel() override;

  absl::StatusOr<at::Tensor> Forward(const at::Tensor& x_t,
                                     const at::Tensor& t) override;
  std::vector<NamedParameter> NamedParameters() const override;
  std::string Architecture() const override { return kTorchScriptArchitecture; }
  ImageShape InputShape() const override { return input_shape_; }
  void SetTraining(bool training) override;
  // Module::to: the module's parameters and buffers. Tensors the module's
  // code creates without a device stay on the CPU (write
  // torch.arange(..., device=t.device)).
  absl::Status To(const c10::Device& device) override;
  // Saves the whole scripted module (code and parameters) with Module::save.
  absl::Status Save(const std::string& path) const override;
  // Loads another TorchScript file and copies its parameters in; the parameter
  // names and shapes must match this module's.
  absl::Status Load(const std::string& path) override;

  // A deep copy of the scripted module (parameters and buffers in storage of
  // their own, leaf tensors with the original's requires_grad), sharing only
  // the compiled code, which is safe to run from several threads.
  absl::StatusOr<std::unique_ptr<DiffusionModel>> Clone() const override;

  const std::string& path() const { return path_; }

 private:
  struct Impl;
  TorchScriptModel(std::string path, const ImageShape& input_shape,
                   std::unique_ptr<Impl> impl);

  std::string path_;
  ImageShape input_shape_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_TORCHSCRIPT_MODEL_H_
