// DiffusionModel: the noise-prediction network ε_θ(x_t, t) behind attribution.
//
// Two implementations: the built-in UNet (unet.h) and a user's TorchScript
// module (torchscript_model.h). Training, featurization and the store build
// only talk to this interface.
//
// Tensors live in host memory (LibTorch CPU) until To() moves the model to
// another device (device.h); Forward then takes inputs on that device. Forward
// keeps the autograd graph when grad mode is on, so callers take gradients with
// respect to NamedParameters() by calling backward() or torch::autograd::grad
// on a loss built from the returned tensor.
//
// Thread safety: Forward may run on several threads at once as long as no
// thread calls Load or SetTraining (or mutates parameters) at the same time.
#ifndef RETRACE_SERVER_MODEL_DIFFUSION_MODEL_H_
#define RETRACE_SERVER_MODEL_DIFFUSION_MODEL_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace retrace::model {

// One trainable tensor and its stable, dotted name ("down.0.res.conv1.weight").
struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

// Shape of one model input image: [channels, height, width].
struct ImageShape {
  int64_t channels = 1;
  int64_t height = 28;
  int64_t width = 28;
};

class DiffusionModel {
 public:
  virtual ~DiffusionModel() = default;

  // x_t: float32 [B, C, H, W]; t: int64 [B] with values in [0, T). Returns the
  // predicted noise, float32 [B, C, H, W]. INVALID_ARGUMENT for wrong
  // shapes/dtypes, INTERNAL for other LibTorch failures, RESOURCE_EXHAUSTED
  // when memory runs out. Never throws.
  virtual absl::StatusOr<at::Tensor> Forward(const at::Tensor& x_t,
                                             const at::Tensor& t) = 0;

  // Every trainable parameter, in a fixed order that is the same on every run
  // and every machine. The tensors share storage with the model.
  virtual std::vector<NamedParameter> NamedParameters() const = 0;

  // Short architecture tag recorded in store manifests ("unet28",
  // "torchscript").
  virtual std::string Architecture() const = 0;

  // Input image shape the model accepts.
  virtual ImageShape InputShape() const = 0;

  // Switches training behaviour (dropout, etc.) on or off. Models start in
  // evaluation mode.
  virtual void SetTraining(bool training) = 0;

  // Writes the parameters to `path` (format chosen by the implementation; Load
  // of the same implementation reads it back). Errors name the file.
  virtual absl::Status Save(const std::string& path) const = 0;

  // Replaces the parameters with those in `path`. NOT_FOUND when the file is
  // missing; INVALID_ARGUMENT / DATA_LOSS naming the file and the parameter
  // when names or shapes do not match this model. On error the model is
  // unchanged.
  virtual absl::Status Load(const std::string& path) = 0;

  // Moves the parameters and buffers to `device` in place: the tensors that
  // NamedParameters() returns afterwards live there, and Forward takes x_t
  // and t on that device. A later Load copies host values in. The default
  // accepts only the CPU for a model on the CPU (UNIMPLEMENTED otherwise);
  // errors from LibTorch as Forward.
  virtual absl::Status To(const c10::Device& device);

  // The device of the parameters (the CPU for a model without parameters).
  c10::Device device() const;

  // A replica for another thread: its own parameter and buffer storage with
  // this model's current values (plain leaf tensors, same requires_grad),
  // the same training mode, sharing no mutable state with this model, so
  // that the two may run Forward and backward passes at the same time.
  // UNIMPLEMENTED for models that offer none (the default). The replica does
  // not follow later Loads of this model; copy the parameters over.
  virtual absl::StatusOr<std::unique_ptr<DiffusionModel>> Clone() const {
    return absl::UnimplementedError("model " + Architecture() +
                                    " offers no replicas (Clone)");
  }
};

// Total number of scalar parameters: the gradient dimension p when every
// parameter is selected (docs/featurization.md).
int64_t CountParameters(const DiffusionModel& model);

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_DIFFUSION_MODEL_H_
