#include "server/model/unet.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cmath>
#include <filesystem>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/model/torch_status.h"

namespace retrace::model {
namespace {

namespace nn = torch::nn;
using torch::Tensor;

// Name of the int64 tensor in saved archives that records the UNetConfig:
// [base_channels, attention, norm_groups, image_channels, image_size, mults...]
constexpr char kConfigKey[] = "__unet_config__";
constexpr double kMaxPeriod = 10000.0;

struct TimeEmbeddingImpl : nn::Module {
  explicit TimeEmbeddingImpl(int64_t dim) : dim(dim) {
    linear1 = register_module("linear1", nn::Linear(dim, 4 * dim));
    linear2 = register_module("linear2", nn::Linear(4 * dim, 4 * dim));
  }

  // t: int64 [B] -> [B, 4·dim]. Sinusoidal features: sin(t·f_k), cos(t·f_k)
  // with f_k = kMaxPeriod^(−k/half), k < half = dim/2.
  Tensor forward(const Tensor& t) {
    const int64_t half = dim / 2;
    Tensor k = torch::arange(
        half, torch::TensorOptions().dtype(torch::kFloat).device(t.device()));
    Tensor freqs = torch::exp(k * (-std::log(kMaxPeriod) / half));
    Tensor args = t.to(torch::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor features = torch::cat({torch::sin(args), torch::cos(args)}, 1);
    return linear2(torch::silu(linear1(features)));
  }

  int64_t dim;
  nn::Linear linear1{nullptr}, linear2{nullptr};
};
TORCH_MODULE(TimeEmbedding);

struct ResBlockImpl : nn::Module {
  ResBlockImpl(int64_t in, int64_t out, int64_t temb_dim, int64_t groups) {
    norm1 = register_module("norm1",
                            nn::GroupNorm(nn::GroupNormOptions(groups, in)));
    conv1 = register_module(
        "conv1", nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)));
    time_proj = register_module("time_proj", nn::Linear(temb_dim, out));
    norm2 = register_module("norm2",
                            nn::GroupNorm(nn::GroupNormOptions(groups, out)));
    conv2 = register_module(
        "conv2", nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(1)));
    if (in != out) {
      skip = register_module("skip", nn::Conv2d(nn::Conv2dOptions(in, out, 1)));
    }
  }

  Tensor forward(const Tensor& x, const Tensor& temb) {
    Tensor h = conv1(torch::silu(norm1(x)));
    h = h + time_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);
    h = conv2(torch::silu(norm2(h)));
    return (skip ? skip(x) : x) + h;
  }

  nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, skip{nullptr};
  nn::Linear time_proj{nullptr};
};
TORCH_MODULE(ResBlock);

struct AttentionImpl : nn::Module {
  AttentionImpl(int64_t channels, int64_t groups) {
    norm = register_module(
        "norm", nn::GroupNorm(nn::GroupNormOptions(groups, channels)));
    qkv = register_module(
        "qkv", nn::Conv2d(nn::Conv2dOptions(channels, 3 * channels, 1)));
    proj = register_module(
        "proj", nn::Conv2d(nn::Conv2dOptions(channels, channels, 1)));
  }

  Tensor forward(const Tensor& x) {
    const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    Tensor parts = qkv(norm(x)).reshape({b, 3, c, h * w});
    Tensor q = parts.select(1, 0), k = parts.select(1, 1),
           v = parts.select(1, 2);
    Tensor weights =
        torch::softmax(torch::bmm(q.transpose(1, 2), k) / std::sqrt(double(c)),
                       /*dim=*/-1);                       // [B, N, N]
    Tensor out = torch::bmm(v, weights.transpose(1, 2));  // [B, C, N]
    return x + proj(out.reshape({b, c, h, w}));
  }

  nn::GroupNorm norm{nullptr};
  nn::Conv2d qkv{nullptr}, proj{nullptr};
};
TORCH_MODULE(Attention);

struct DownLevelImpl : nn::Module {
  DownLevelImpl(int64_t in, int64_t out, int64_t temb_dim, int64_t groups,
                bool attention, bool downsample_after) {
    res = register_module("res", ResBlock(in, out, temb_dim, groups));
    if (attention) attn = register_module("attn", Attention(out, groups));
    if (downsample_after) {
      downsample = register_module(
          "downsample",
          nn::Conv2d(nn::Conv2dOptions(out, out, 3).stride(2).padding(1)));
    }
  }
  ResBlock res{nullptr};
  Attention attn{nullptr};
  nn::Conv2d downsample{nullptr};
};
TORCH_MODULE(DownLevel);

struct MidBlockImpl : nn::Module {
  MidBlockImpl(int64_t channels, int64_t temb_dim, int64_t groups,
               bool attention) {
    res1 =
        register_module("res1", ResBlock(channels, channels, temb_dim, groups));
    if (attention) attn = register_module("attn", Attention(channels, groups));
    res2 =
        register_module("res2", ResBlock(channels, channels, temb_dim, groups));
  }
  Tensor forward(Tensor h, const Tensor& temb) {
    h = res1(h, temb);
    if (attn) h = attn(h);
    return res2(h, temb);
  }
  ResBlock res1{nullptr}, res2{nullptr};
  Attention attn{nullptr};
};
TORCH_MODULE(MidBlock);

struct UpLevelImpl : nn::Module {
  UpLevelImpl(int64_t in, int64_t out, int64_t temb_dim, int64_t groups,
              bool attention, bool upsample_after) {
    res = register_module("res", ResBlock(in, out, temb_dim, groups));
    if (attention) attn = register_module("attn", Attention(out, groups));
    if (upsample_after) {
      upsample = register_module(
          "upsample", nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(1)));
    }
  }
  ResBlock res{nullptr};
  Attention attn{nullptr};
  nn::Conv2d upsample{nullptr};
};
TORCH_MODULE(UpLevel);

struct UNetNetImpl : nn::Module {
  explicit UNetNetImpl(const UNetConfig& config) {
    const int64_t base = config.base_channels;
    const int64_t temb_dim = 4 * base;
    const int64_t groups = config.norm_groups;
    const int64_t levels = static_cast<int64_t>(config.channel_mults.size());
    time_embed = register_module("time_embed", TimeEmbedding(base));
    conv_in = register_module(
        "conv_in",
        nn::Conv2d(
            nn::Conv2dOptions(config.image_channels, base, 3).padding(1)));
    nn::ModuleList down_list;
    int64_t channels = base;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t out = base * config.channel_mults[l];
      const bool last = l == levels - 1;
      down_levels.push_back(DownLevel(channels, out, temb_dim, groups,
                                      config.attention && last, !last));
      down_list->push_back(down_levels.back());
      channels = out;
    }
    register_module("down", down_list);
    mid = register_module(
        "mid", MidBlock(channels, temb_dim, groups, config.attention));
    // Built in level order (up.0 = full resolution); run in reverse.
    std::vector<int64_t> level_in(levels);
    for (int64_t l = levels - 1; l >= 0; --l) {
      level_in[l] = channels + base * config.channel_mults[l];
      channels = base * config.channel_mults[l];
    }
    nn::ModuleList up_list;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t out = base * config.channel_mults[l];
      up_levels.push_back(UpLevel(level_in[l], out, temb_dim, groups,
                                  config.attention && l == levels - 1, l > 0));
      up_list->push_back(up_levels.back());
    }
    register_module("up", up_list);
    out_norm = register_module(
        "out_norm", nn::GroupNorm(nn::GroupNormOptions(groups, base)));
    out_conv = register_module(
        "out_conv",
        nn::Conv2d(
            nn::Conv2dOptions(base, config.image_channels, 3).padding(1)));
  }

  Tensor forward(const Tensor& x, const Tensor& t) {
    Tensor temb = time_embed(t);
    Tensor h = conv_in(x);
    std::vector<Tensor> skips;
    for (DownLevel& level : down_levels) {
      h = level->res(h, temb);
      if (level->attn) h = level->attn(h);
      skips.push_back(h);
      if (level->downsample) h = level->downsample(h);
    }
    h = mid(h, temb);
    for (int64_t l = static_cast<int64_t>(up_levels.size()) - 1; l >= 0; --l) {
      UpLevel& level = up_levels[l];
      h = level->res(torch::cat({h, skips[l]}, 1), temb);
      if (level->attn) h = level->attn(h);
      if (level->upsample) {
        h = level->upsample(
            at::upsample_nearest2d(h, {2 * h.size(2), 2 * h.size(3)}));
      }
    }
    return out_conv(torch::silu(out_norm(h)));
  }

  TimeEmbedding time_embed{nullptr};
  nn::Conv2d conv_in{nullptr}, out_conv{nullptr};
  std::vector<DownLevel> down_levels;
  MidBlock mid{nullptr};
  std::vector<UpLevel> up_levels;
  nn::GroupNorm out_norm{nullptr};
};
TORCH_MODULE(UNetNet);

// Fills parameters module by module in registration order: GroupNorm scale 1,
// shift 0; conv and linear weights and biases from U(−1/√fan_in, 1/√fan_in).
void InitializeFromSeed(nn::Module& root, uint64_t seed) {
  torch::NoGradGuard no_grad;
  at::Generator generator = at::detail::createCPUGenerator(seed);
  for (const std::shared_ptr<nn::Module>& module : root.modules()) {
    if (auto* norm = module->as<nn::GroupNorm>()) {
      norm->weight.fill_(1.0);
      norm->bias.fill_(0.0);
      continue;
    }
    int64_t fan_in = 0;
    Tensor weight, bias;
    if (auto* conv = module->as<nn::Conv2d>()) {
      fan_in = conv->weight[0].numel();
      weight = conv->weight;
      bias = conv->bias;
    } else if (auto* linear = module->as<nn::Linear>()) {
      fan_in = linear->weight.size(1);
      weight = linear->weight;
      bias = linear->bias;
    } else {
      continue;
    }
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    weight.uniform_(-bound, bound, generator);
    if (bias.defined()) bias.uniform_(-bound, bound, generator);
  }
}

absl::Status ValidateConfig(const UNetConfig& config) {
  if (config.base_channels < 2 || config.base_channels % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unet: base_channels must be even and >= 2, got ",
                     config.base_channels));
  }
  if (config.norm_groups < 1 ||
      config.base_channels % config.norm_groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unet: base_channels (", config.base_channels,
        ") must be divisible by norm_groups (", config.norm_groups, ")"));
  }
  if (config.channel_mults.empty()) {
    return absl::InvalidArgumentError("unet: channel_mults is empty");
  }
  for (int64_t mult : config.channel_mults) {
    if (mult < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet: channel_mults must be >= 1, got {",
                       absl::StrJoin(config.channel_mults, ", "), "}"));
    }
  }
  if (config.image_channels < 1) {
    return absl::InvalidArgumentError("unet: image_channels must be >= 1");
  }
  const int64_t factor = int64_t{1} << (config.channel_mults.size() - 1);
  if (config.image_size < factor || config.image_size % factor != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unet: image_size ", config.image_size, " must be divisible by ",
        factor, " for ", config.channel_mults.size(), " levels"));
  }
  return absl::OkStatus();
}

Tensor ConfigTensor(const UNetConfig& config) {
  std::vector<int64_t> values = {config.base_channels, config.attention ? 1 : 0,
                                 config.norm_groups, config.image_channels,
                                 config.image_size};
  values.insert(values.end(), config.channel_mults.begin(),
                config.channel_mults.end());
  return torch::tensor(values, torch::TensorOptions().dtype(torch::kLong));
}

}  // namespace

struct UNetModel::Impl {
  UNetNet net{nullptr};
};

UNetModel::UNetModel(const UNetConfig& config, std::unique_ptr<Impl> impl)
    : config_(config), impl_(std::move(impl)) {}

UNetModel::~UNetModel() = default;

absl::StatusOr<std::unique_ptr<UNetModel>> UNetModel::Create(
    const UNetConfig& config, uint64_t seed) {
  absl::Status valid = ValidateConfig(config);
  if (!valid.ok()) return valid;
  return internal::CallTorch(
      "unet", [&]() -> absl::StatusOr<std::unique_ptr<UNetModel>> {
        auto impl = std::make_unique<Impl>();
        impl->net = UNetNet(config);
        InitializeFromSeed(*impl->net, seed);
        impl->net->eval();
        return std::unique_ptr<UNetModel>(
            new UNetModel(config, std::move(impl)));
      });
}

absl::StatusOr<at::Tensor> UNetModel::Forward(const at::Tensor& x_t,
                                              const at::Tensor& t) {
  if (!x_t.defined() || x_t.dim() != 4 || x_t.scalar_type() != at::kFloat ||
      x_t.size(1) != config_.image_channels ||
      x_t.size(2) != config_.image_size || x_t.size(3) != config_.image_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unet: x_t must be float32 [B, ", config_.image_channels, ", ",
        config_.image_size, ", ", config_.image_size, "], got ",
        x_t.defined()
            ? absl::StrCat(x_t.sizes().vec().size(), "-d ",
                           c10::toString(x_t.scalar_type()), " [",
                           absl::StrJoin(x_t.sizes().vec(), ", "), "]")
            : "undefined"));
  }
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != at::kLong ||
      t.size(0) != x_t.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unet: t must be int64 [", x_t.size(0), "], got ",
        t.defined() ? absl::StrCat(c10::toString(t.scalar_type()), " [",
                                   absl::StrJoin(t.sizes().vec(), ", "), "]")
                    : "undefined"));
  }
  return internal::CallTorch("unet forward", [&]() -> absl::StatusOr<Tensor> {
    return impl_->net->forward(x_t, t);
  });
}

std::vector<NamedParameter> UNetModel::NamedParameters() const {
  std::vector<NamedParameter> out;
  for (const auto& item : impl_->net->named_parameters(/*recurse=*/true)) {
    out.push_back(NamedParameter{item.key(), item.value()});
  }
  return out;
}

ImageShape UNetModel::InputShape() const {
  return ImageShape{config_.image_channels, config_.image_size,
                    config_.image_size};
}

void UNetModel::SetTraining(bool training) { impl_->net->train(training); }

absl::Status UNetModel::To(const c10::Device& device) {
  return internal::CallTorch(absl::StrCat("moving unet to ", device.str()),
                             [&]() -> absl::Status {
                               // nn::Module::to swaps each parameter's data in
                               // place, so tensors held elsewhere (an
                               // optimizer, the layerwise mirror) follow.
                               impl_->net->to(device);
                               return absl::OkStatus();
                             });
}

absl::Status UNetModel::Save(const std::string& path) const {
  return internal::CallTorch(
      absl::StrCat("saving unet to ", path), [&]() -> absl::Status {
        torch::serialize::OutputArchive archive;
        archive.write(kConfigKey, ConfigTensor(config_));
        for (const auto& item : impl_->net->named_parameters(true)) {
          archive.write(item.key(), item.value().detach().to(torch::kCPU));
        }
        archive.save_to(path);
        return absl::OkStatus();
      });
}

absl::Status UNetModel::Load(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(absl::StrCat(
        "unet checkpoint ", path, " does not exist or is not a file"));
  }
  return internal::CallTorch(
      absl::StrCat("loading unet from ", path), [&]() -> absl::Status {
        torch::serialize::InputArchive archive;
        archive.load_from(path);
        Tensor config;
        if (!archive.try_read(kConfigKey, config) ||
            !torch::equal(config, ConfigTensor(config_))) {
          return absl::InvalidArgumentError(absl::StrCat(
              "unet checkpoint ", path,
              " was saved with a different UNet configuration (or is not a "
              "UNet checkpoint)"));
        }
        std::vector<std::pair<Tensor, Tensor>> staged;
        for (const auto& item : impl_->net->named_parameters(true)) {
          Tensor value;
          if (!archive.try_read(item.key(), value)) {
            return absl::InvalidArgumentError(absl::StrCat(
                "unet checkpoint ", path, " lacks parameter ", item.key()));
          }
          if (!value.sizes().equals(item.value().sizes()) ||
              value.scalar_type() != item.value().scalar_type()) {
            return absl::InvalidArgumentError(absl::StrCat(
                "unet checkpoint ", path, ": parameter ", item.key(),
                " has shape [", absl::StrJoin(value.sizes().vec(), ", "),
                "], expected [",
                absl::StrJoin(item.value().sizes().vec(), ", "), "]"));
          }
          staged.emplace_back(item.value(), value);
        }
        torch::NoGradGuard no_grad;
        for (auto& [param, value] : staged) param.copy_(value);
        return absl::OkStatus();
      });
}

}  // namespace retrace::model
