#include "server/featurize/unet_mirror.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace retrace::featurize::internal {
namespace {

// Values that unet.cc uses (its constants are file-local there).
constexpr double kMaxPeriod = 10000.0;
constexpr double kGroupNormEps = 1e-5;

// The last dotted component of a layer name decides its kind.
bool KindFromName(absl::string_view name, LayerKind* kind) {
  const size_t dot = name.rfind('.');
  const absl::string_view leaf =
      dot == absl::string_view::npos ? name : name.substr(dot + 1);
  for (absl::string_view conv :
       {"conv_in", "conv1", "conv2", "skip", "qkv", "proj", "downsample",
        "upsample", "out_conv"}) {
    if (leaf == conv) {
      *kind = LayerKind::kConv2d;
      return true;
    }
  }
  for (absl::string_view linear : {"linear1", "linear2", "time_proj"}) {
    if (leaf == linear) {
      *kind = LayerKind::kLinear;
      return true;
    }
  }
  for (absl::string_view norm : {"norm1", "norm2", "norm", "out_norm"}) {
    if (leaf == norm) {
      *kind = LayerKind::kGroupNorm;
      return true;
    }
  }
  return false;
}

std::string Shape(const at::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes().vec(), ", "), "]");
}

}  // namespace

absl::StatusOr<UNetMirror> UNetMirror::Create(
    const model::UNetConfig& config,
    const std::vector<model::NamedParameter>& params) {
  UNetMirror mirror;
  mirror.config_ = config;
  for (int i = 0; i < static_cast<int>(params.size()); ++i) {
    const std::string& full = params[i].name;
    const bool is_weight = absl::EndsWith(full, ".weight");
    const bool is_bias = absl::EndsWith(full, ".bias");
    if (!is_weight && !is_bias) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet mirror: unexpected parameter ", full));
    }
    const std::string name = full.substr(0, full.size() - (is_weight ? 7 : 5));
    LayerKind kind;
    if (!KindFromName(name, &kind)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet mirror: parameter ", full, " of unknown layer"));
    }
    auto [it, inserted] = mirror.layer_index_.try_emplace(
        name, static_cast<int>(mirror.layers_.size()));
    if (inserted) {
      MirrorLayer layer;
      layer.kind = kind;
      layer.name = name;
      layer.groups = config.norm_groups;
      mirror.layers_.push_back(layer);
    }
    MirrorLayer& layer = mirror.layers_[it->second];
    (is_weight ? layer.weight_index : layer.bias_index) = i;
    mirror.params_.push_back(params[i].tensor);
  }
  for (MirrorLayer& layer : mirror.layers_) {
    if (layer.weight_index < 0 || layer.bias_index < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unet mirror: layer ", layer.name, " lacks its weight or bias"));
    }
    const at::Tensor& w = mirror.params_[layer.weight_index];
    const int64_t expected_dim = layer.kind == LayerKind::kLinear   ? 2
                                 : layer.kind == LayerKind::kConv2d ? 4
                                                                    : 1;
    if (w.dim() != expected_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet mirror: ", layer.name, ".weight has shape ",
                       Shape(w), ", expected rank ", expected_dim));
    }
    if (layer.kind == LayerKind::kConv2d) {
      if (w.size(2) != w.size(3) || w.size(2) % 2 != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("unet mirror: ", layer.name, ".weight has shape ",
                         Shape(w), ", expected an odd square kernel"));
      }
      layer.kernel = w.size(2);
      layer.padding = w.size(2) / 2;
      layer.stride = absl::EndsWith(layer.name, ".downsample") ? 2 : 1;
    }
  }
  return mirror;
}

// One forward pass: the module structure of unet.cc written as functions.
class UNetMirror::Pass {
 public:
  Pass(const UNetMirror& mirror, const std::vector<bool>* tap_layer,
       std::vector<LayerTap>* taps)
      : m_(mirror), tap_layer_(tap_layer), taps_(taps) {}

  at::Tensor Run(const at::Tensor& x, const at::Tensor& t) {
    const int64_t levels =
        static_cast<int64_t>(m_.config_.channel_mults.size());
    const at::Tensor temb = TimeEmbedding(t, x.scalar_type());
    at::Tensor h = Layer("conv_in", x);
    std::vector<at::Tensor> skips;
    for (int64_t l = 0; l < levels; ++l) {
      const std::string prefix = absl::StrCat("down.", l);
      h = ResBlock(prefix + ".res", h, temb);
      if (Has(prefix + ".attn.norm")) h = Attention(prefix + ".attn", h);
      skips.push_back(h);
      if (Has(prefix + ".downsample")) h = Layer(prefix + ".downsample", h);
    }
    h = ResBlock("mid.res1", h, temb);
    if (Has("mid.attn.norm")) h = Attention("mid.attn", h);
    h = ResBlock("mid.res2", h, temb);
    for (int64_t l = levels - 1; l >= 0; --l) {
      const std::string prefix = absl::StrCat("up.", l);
      h = ResBlock(prefix + ".res", at::cat({h, skips[l]}, 1), temb);
      if (Has(prefix + ".attn.norm")) h = Attention(prefix + ".attn", h);
      if (Has(prefix + ".upsample")) {
        h = Layer(prefix + ".upsample",
                  at::upsample_nearest2d(h, {2 * h.size(2), 2 * h.size(3)}));
      }
    }
    return Layer("out_conv", at::silu(Layer("out_norm", h)));
  }

 private:
  bool Has(const std::string& name) const {
    return m_.layer_index_.contains(name);
  }

  at::Tensor TimeEmbedding(const at::Tensor& t, at::ScalarType dtype) {
    const int64_t half = m_.config_.base_channels / 2;
    at::Tensor k =
        at::arange(half, at::TensorOptions().dtype(dtype).device(t.device()));
    at::Tensor freqs = at::exp(k * (-std::log(kMaxPeriod) / half));
    at::Tensor args = t.to(dtype).unsqueeze(1) * freqs.unsqueeze(0);
    at::Tensor features = at::cat({at::sin(args), at::cos(args)}, 1);
    return Layer("time_embed.linear2",
                 at::silu(Layer("time_embed.linear1", features)));
  }

  at::Tensor ResBlock(const std::string& prefix, const at::Tensor& x,
                      const at::Tensor& temb) {
    at::Tensor h =
        Layer(prefix + ".conv1", at::silu(Layer(prefix + ".norm1", x)));
    h = h + Layer(prefix + ".time_proj", at::silu(temb))
                .unsqueeze(-1)
                .unsqueeze(-1);
    h = Layer(prefix + ".conv2", at::silu(Layer(prefix + ".norm2", h)));
    return (Has(prefix + ".skip") ? Layer(prefix + ".skip", x) : x) + h;
  }

  at::Tensor Attention(const std::string& prefix, const at::Tensor& x) {
    const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    at::Tensor parts = Layer(prefix + ".qkv", Layer(prefix + ".norm", x))
                           .reshape({b, 3, c, h * w});
    at::Tensor q = parts.select(1, 0), k = parts.select(1, 1),
               v = parts.select(1, 2);
    at::Tensor weights = at::softmax(
        at::bmm(q.transpose(1, 2), k) / std::sqrt(double(c)), /*dim=*/-1);
    at::Tensor out = at::bmm(v, weights.transpose(1, 2));
    return x + Layer(prefix + ".proj", out.reshape({b, c, h, w}));
  }

  // Applies the named layer exactly as its torch::nn module does, recording
  // a tap when asked to.
  at::Tensor Layer(const std::string& name, const at::Tensor& x) {
    auto it = m_.layer_index_.find(name);
    TORCH_CHECK(it != m_.layer_index_.end(), "unet mirror: no layer ", name);
    const int index = it->second;
    const MirrorLayer& layer = m_.layers_[index];
    const at::Tensor& w = m_.params_[layer.weight_index];
    const at::Tensor& b = m_.params_[layer.bias_index];
    at::Tensor y;
    switch (layer.kind) {
      case LayerKind::kLinear:
        y = at::linear(x, w, b);
        break;
      case LayerKind::kConv2d:
        y = at::conv2d(x, w, b, {layer.stride, layer.stride},
                       {layer.padding, layer.padding}, {1, 1}, 1);
        break;
      case LayerKind::kGroupNorm:
        y = at::group_norm(x, layer.groups, w, b, kGroupNormEps);
        break;
    }
    if (taps_ != nullptr && tap_layer_ != nullptr && (*tap_layer_)[index]) {
      LayerTap tap;
      tap.layer = index;
      tap.output = y;
      if (layer.kind == LayerKind::kGroupNorm) {
        // x̂ only feeds the closed-form weight gradient, never the loss.
        at::NoGradGuard no_grad;
        tap.input =
            at::group_norm(x.detach(), layer.groups, {}, {}, kGroupNormEps);
      } else {
        tap.input = x.detach();
      }
      taps_->push_back(std::move(tap));
    }
    return y;
  }

  const UNetMirror& m_;
  const std::vector<bool>* tap_layer_;
  std::vector<LayerTap>* taps_;
};

at::Tensor UNetMirror::Forward(const at::Tensor& x_t, const at::Tensor& t,
                               const std::vector<bool>* tap_layer,
                               std::vector<LayerTap>* taps) const {
  Pass pass(*this, tap_layer, taps);
  return pass.Run(x_t, t);
}

}  // namespace retrace::featurize::internal
