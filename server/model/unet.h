// The built-in UNet: a small noise-prediction network for 28×28 grayscale
// images (Fashion-MNIST, MNIST), written with LibTorch C++ modules.
//
// Architecture (C = base_channels, c_l = C·channel_mults[l], L levels, G
// groups):
//   time embedding: sinusoidal(t, C) -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)
//   conv_in 3×3 (1 -> c_0)
//   down level l: ResBlock(-> c_l) [+ self-attention at the last level], then
//                 a stride-2 3×3 conv unless l = L-1 (28 -> 14 -> 7)
//   mid: ResBlock, [self-attention], ResBlock at c_{L-1}
//   up level l (from L-1 to 0): ResBlock(concat(h, skip_l) -> c_l)
//                 [+ self-attention at the last level], then nearest ×2 and a
//                 3×3 conv unless l = 0
//   out: GroupNorm, SiLU, conv_out 3×3 (c_0 -> 1)
// ResBlock(a -> b): GroupNorm, SiLU, conv1 3×3, + Linear(SiLU(temb)) per
// channel, GroupNorm, SiLU, conv2 3×3, plus the input (1×1 conv `skip` when
// a ≠ b). Self-attention: GroupNorm, single-head attention over positions with
// 1×1 convs `qkv` (c -> 3c) and `proj` (c -> c), residual.
//
// Parameter names (NamedParameters order = this order, depth first):
//   time_embed.linear1.{weight,bias}, time_embed.linear2.{weight,bias},
//   conv_in.{weight,bias},
//   down.<l>.res.{norm1,conv1,time_proj,norm2,conv2[,skip]}.{weight,bias},
//   down.<L-1>.attn.{norm,qkv,proj}.{weight,bias},   (attention on)
//   down.<l>.downsample.{weight,bias}                 (l < L-1)
//   mid.res1.*, mid.attn.* (attention on), mid.res2.*,
//   up.<l>.res.*, up.<L-1>.attn.* (attention on), up.<l>.upsample.{weight,bias}
//   (l > 0), out_norm.{weight,bias}, out_conv.{weight,bias}
// `up` is indexed by level like `down` (up.0 works at full resolution) and
// lists levels in that order, although the forward pass runs them from L-1
// down to 0.
//
// Defaults (C = 16, mults {1, 2, 4}, attention on, G = 8) give about 0.5M
// parameters and a forward+backward of a batch of 64 in well under a second on
// two CPU cores.
//
// Initialization is a pure function of the seed: every weight and bias is drawn
// from U(−1/√fan_in, 1/√fan_in) by a generator seeded with `seed`, in parameter
// order; GroupNorm scales start at 1 and shifts at 0.
#ifndef RETRACE_SERVER_MODEL_UNET_H_
#define RETRACE_SERVER_MODEL_UNET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/diffusion_model.h"

namespace retrace::model {

struct UNetConfig {
  int64_t base_channels = 16;
  std::vector<int64_t> channel_mults = {1, 2, 4};
  // Self-attention at the lowest resolution (down, mid and up).
  bool attention = true;
  int64_t norm_groups = 8;
  // Input images: [image_channels, image_size, image_size]. image_size must be
  // divisible by 2^(levels-1).
  int64_t image_channels = 1;
  int64_t image_size = 28;
};

// Tag written to manifests for this architecture.
inline constexpr char kUNetArchitecture[] = "unet";

class UNetModel final : public DiffusionModel {
 public:
  // INVALID_ARGUMENT when the config is inconsistent (channels not divisible
  // by norm_groups, image_size not divisible by 2^(levels-1), empty mults...).
  static absl::StatusOr<std::unique_ptr<UNetModel>> Create(
      const UNetConfig& config, uint64_t seed);
  ~UNetModel() override;

  absl::StatusOr<at::Tensor> Forward(const at::Tensor& x_t,
                                     const at::Tensor& t) override;
  std::vector<NamedParameter> NamedParameters() const override;
  std::string Architecture() const override { return kUNetArchitecture; }
  ImageShape InputShape() const override;
  void SetTraining(bool training) override;
  absl::Status To(const c10::Device& device) override;
  // LibTorch archive (torch::serialize) keyed by parameter name, host
  // tensors whatever the model's device (a GPU run's checkpoints load on a
  // CPU machine).
  absl::Status Save(const std::string& path) const override;
  absl::Status Load(const std::string& path) override;

  const UNetConfig& config() const { return config_; }

 private:
  struct Impl;
  UNetModel(const UNetConfig& config, std::unique_ptr<Impl> impl);

  UNetConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_UNET_H_
