// Internal to retrace_featurize: a functional copy of the built-in UNet's
// forward pass (server/model/unet.cc) that records, for chosen layers, the
// layer input and the layer output. From these the per-sample gradient of
// every Linear, Conv2d and GroupNorm weight and bias follows in closed form
// (group_gradients.cc), which LibTorch C++ modules cannot offer directly (they
// have no forward hooks).
//
// The mirror calls the same ATen operators in the same order as the module
// code, reading the model's own parameter tensors, so its output equals
// UNetModel::Forward bit for bit; group_gradients.cc checks this at start-up
// and refuses the mirror (falling back to the loop) if unet.cc has changed.
//
// Works in any floating dtype: the parameters given to Create decide it (the
// tests run it in double for finite differences).
//
// Thread safety: Forward is const and may run concurrently.
#ifndef RETRACE_SERVER_FEATURIZE_UNET_MIRROR_H_
#define RETRACE_SERVER_FEATURIZE_UNET_MIRROR_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "server/model/diffusion_model.h"
#include "server/model/unet.h"

namespace retrace::featurize::internal {

enum class LayerKind { kLinear, kConv2d, kGroupNorm };

// One parametric layer. weight_index / bias_index index the parameter list
// the mirror was created from (the model's NamedParameters order).
struct MirrorLayer {
  LayerKind kind = LayerKind::kLinear;
  std::string name;  // "down.0.res.conv1"
  int weight_index = -1;
  int bias_index = -1;
  int64_t kernel = 1;   // kConv2d: square kernel size
  int64_t stride = 1;   // kConv2d
  int64_t padding = 0;  // kConv2d
  int64_t groups = 1;   // kGroupNorm
};

// What Forward records for a tapped layer.
struct LayerTap {
  int layer = -1;
  // kLinear / kConv2d: the layer input (detached). kGroupNorm: the
  // normalized input x̂ before the affine step (detached).
  at::Tensor input;
  // The layer output, on the autograd graph.
  at::Tensor output;
};

class UNetMirror {
 public:
  // Binds the layers to `params` by name. INVALID_ARGUMENT when a layer's
  // parameter is missing or misshapen, or a parameter belongs to no layer.
  static absl::StatusOr<UNetMirror> Create(
      const model::UNetConfig& config,
      const std::vector<model::NamedParameter>& params);

  // ε̂ = UNet(x_t, t). When `taps` is not null, layers with tap_layer[l] true
  // are recorded in forward order. May throw c10::Error (callers wrap it).
  at::Tensor Forward(const at::Tensor& x_t, const at::Tensor& t,
                     const std::vector<bool>* tap_layer,
                     std::vector<LayerTap>* taps) const;

  const std::vector<MirrorLayer>& layers() const { return layers_; }

 private:
  class Pass;

  model::UNetConfig config_;
  std::vector<at::Tensor> params_;
  std::vector<MirrorLayer> layers_;
  absl::flat_hash_map<std::string, int> layer_index_;
};

}  // namespace retrace::featurize::internal

#endif  // RETRACE_SERVER_FEATURIZE_UNET_MIRROR_H_
