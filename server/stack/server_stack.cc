#include "server/stack/server_stack.h"

#include <ATen/Parallel.h>

#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/allocator.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/device.h"
#include "prometheus/registry.h"
#include "server/data/mixture.h"
#include "server/model/device.h"
#include "server/service/model_featurizer.h"

namespace retrace::stack {
namespace {

absl::StatusOr<scoring::DeviceChoice> ScanDevice(const std::string& name) {
  if (name == "auto") return scoring::DeviceChoice::kAuto;
  if (name == "cpu") return scoring::DeviceChoice::kCpu;
  if (name == "cuda") return scoring::DeviceChoice::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("device must be auto, cpu or cuda, got '", name, "'"));
}

// "I/N" -> part I of N.
absl::Status ParsePart(const std::string& text, int64_t* index,
                       int64_t* count) {
  const size_t slash = text.find('/');
  if (slash == std::string::npos ||
      !absl::SimpleAtoi(text.substr(0, slash), index) ||
      !absl::SimpleAtoi(text.substr(slash + 1), count) || *count < 1 ||
      *index < 0 || *index >= *count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--shard-part must be I/N with 0 <= I < N, got '", text, "'"));
  }
  return absl::OkStatus();
}

// How often a router re-checks its shards, and how long it waits for them
// at start-up before giving up.
constexpr absl::Duration kWatchInterval = absl::Seconds(2);
constexpr absl::Duration kShardStartupWait = absl::Minutes(10);

}  // namespace

ServerStack::ServerStack(const ServerConfig& config, StackOverrides overrides)
    : config_(config), overrides_(std::move(overrides)) {}

ServerStack::~ServerStack() { Shutdown(absl::ZeroDuration()); }

absl::StatusOr<std::unique_ptr<ServerStack>> ServerStack::Create(
    const ServerConfig& config, StackOverrides overrides) {
  if (overrides.clock == nullptr) {
    return absl::InvalidArgumentError("the stack needs a clock");
  }
  std::unique_ptr<ServerStack> stack(
      new ServerStack(config, std::move(overrides)));
  if (config.threads > 0) at::set_num_threads(config.threads);
  RETURN_IF_ERROR(stack->Listen());
  RETURN_IF_ERROR(stack->Load());
  return stack;
}

// Metrics and the gRPC server first, so that health checks and scrapes get
// answers (NOT_SERVING, not ready) while the store and the model load.
absl::Status ServerStack::Listen() {
  registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = std::make_unique<metrics::Metrics>(*registry_);
  if (config_.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
        metrics::MetricsEndpoint::Start(
            absl::StrCat(config_.metrics_host, ":", config_.metrics_port),
            registry_);
    if (!endpoint.ok()) {
      return absl::Status(
          endpoint.status().code(),
          absl::StrCat("metrics: ", endpoint.status().message()));
    }
    endpoint_ = std::move(*endpoint);
    RETRACE_LOG(INFO) << "metrics on port " << endpoint_->port();
  }

  service::ServiceOptions service_options;
  service_options.max_concurrent = config_.max_concurrent;
  if (!config_.token_file.empty()) {
    ASSIGN_OR_RETURN(service_options.tokens,
                     service::LoadTokenFile(config_.token_file));
  }
  service_ = std::make_unique<service::AttributionService>(service_options,
                                                           metrics_.get());

  service::GrpcServerOptions server_options;
  server_options.listen = config_.listen;
  server_options.tls_cert_file = config_.tls_cert;
  server_options.tls_key_file = config_.tls_key;
  server_options.tls_client_ca_file = config_.tls_client_ca;
  server_options.max_message_bytes = config_.max_message_bytes;
  ASSIGN_OR_RETURN(server_,
                   service::GrpcServer::Start(server_options, service_.get()));
  RETRACE_LOG(INFO) << "listening on port " << server_->port()
                    << (server_->tls() ? " (TLS)" : "")
                    << "; loading (health NOT_SERVING)";
  if (!config_.port_file.empty()) {
    RETURN_IF_ERROR(WriteFileAtomically(config_.port_file,
                                        absl::StrCat(server_->port(), "\n")));
  }
  return absl::OkStatus();
}

absl::Status ServerStack::Load() {
  if (config_.role == "router") return LoadRouter();
  // First, so that `--featurize-device cuda` without CUDA stops start-up
  // before the store is read.
  ASSIGN_OR_RETURN(model::DeviceChoice featurize_device,
                   model::ParseDeviceChoice(config_.featurize_device));
  ASSIGN_OR_RETURN(featurize_device, model::ResolveDevice(featurize_device));
  ASSIGN_OR_RETURN(const scoring::DeviceChoice scan_device,
                   ScanDevice(config_.device));
  service::BatcherOptions batcher_options;
  batcher_options.max_batch = config_.max_batch;
  batcher_options.max_queue_delay_us = config_.max_queue_delay_us;
  batcher_options.max_queue = config_.max_queue;
  batcher_options.clock = overrides_.clock;
  RETURN_IF_ERROR(service::Batcher::CheckOptions(batcher_options));

  store::StoreReader::Options store_options;
  store_options.verify_checksums = config_.verify_checksums;
  if (config_.role == "shard") {
    RETURN_IF_ERROR(ParsePart(config_.shard_part, &store_options.part_index,
                              &store_options.num_parts));
  } else if (config_.role != "single") {
    return absl::InvalidArgumentError(absl::StrCat(
        "role must be single, shard or router, got '", config_.role, "'"));
  }
  ASSIGN_OR_RETURN(store_,
                   store::StoreReader::Open(config_.store_dir, store_options));
  RETRACE_LOG(INFO) << "store " << store_->manifest().store_id << ": "
                    << store_->num_samples() << " samples; serving ["
                    << store_->served_first() << ", " << store_->served_end()
                    << "), " << store_->total_vector_bytes() << " bytes";
  scoring::ScorerOptions scorer_options;
  scorer_options.device = scan_device;
  scorer_options.cpu_threads = config_.threads;
  // Scratch for the largest batch the batcher will form, reserved at start-up.
  scorer_options.max_batch = config_.max_batch;
  ASSIGN_OR_RETURN(scorer_,
                   scoring::Scorer::Create(store_.get(), scorer_options));
  RETRACE_LOG(INFO) << "scoring on "
                    << kernels::BackendName(scorer_->backend());

  if (!config_.model_path.empty()) {
    ASSIGN_OR_RETURN(model_featurizer_,
                     service::ModelQueryFeaturizer::Create(
                         store_->manifest(), config_.model_path,
                         config_.workers, featurize_device));
    featurizer_ = model_featurizer_.get();
    if (overrides_.wrap_featurizer) {
      wrapped_featurizer_ = overrides_.wrap_featurizer(featurizer_);
      featurizer_ = wrapped_featurizer_.get();
    }
    RETRACE_LOG(INFO) << "featurizing queries on "
                      << model::DeviceChoiceName(featurize_device);
  } else {
    RETRACE_LOG(INFO) << "no --model: serving precomputed query vectors only";
  }

  if (config_.thumbnails) {
    const data::DataLocations locations =
        data::DataLocationsFrom(config_.fashion_mnist_dir, config_.mnist_dir);
    absl::StatusOr<std::unique_ptr<service::TrainingImages>> images =
        service::LoadTrainingImages(*store_, locations);
    if (images.ok()) {
      images_ = std::move(*images);
    } else {
      RETRACE_LOG(WARNING) << "serving without thumbnails: "
                           << images.status().message();
    }
  }

  scoring::Scorer* scorer = scorer_.get();
  batcher_ = std::make_unique<service::Batcher>(
      [scorer](const std::vector<scoring::ScoreQuery>& batch) {
        return scorer->Score(batch);
      },
      batcher_options, metrics_.get());
  service::EngineParts parts;
  parts.store = store_.get();
  parts.shape = scorer_->shape();
  parts.backend = kernels::BackendName(scorer_->backend());
  parts.batcher = batcher_.get();
  parts.featurizer = featurizer_;
  parts.images = images_.get();
  parts.metrics = metrics_.get();
  parts.clock = overrides_.clock;
  engine_ = std::make_unique<service::AttributionEngine>(parts);
  serving_ = engine_.get();
  metrics_->SetStore(store_->served_samples(), store_->total_vector_bytes());
  metrics_->SetDeviceMemory(scorer_->device_bytes());
  return absl::OkStatus();
}

absl::Status ServerStack::LoadRouter() {
  ASSIGN_OR_RETURN(model::DeviceChoice featurize_device,
                   model::ParseDeviceChoice(config_.featurize_device));
  ASSIGN_OR_RETURN(featurize_device, model::ResolveDevice(featurize_device));
  router::RouterOptions options;
  options.shards = config_.shards;
  options.shard_timeout = absl::Seconds(config_.shard_timeout_s);
  options.connection.tls_ca_file = config_.shard_ca;
  options.connection.max_message_bytes = config_.max_message_bytes;
  if (!config_.shard_token_file.empty()) {
    ASSIGN_OR_RETURN(const std::vector<std::string> tokens,
                     service::LoadTokenFile(config_.shard_token_file));
    options.connection.token = tokens.front();
  }
  // The shards may start after the router (or load a large store): wait for
  // them, saying why, while health says NOT_SERVING.
  const absl::Time give_up = absl::Now() + kShardStartupWait;
  absl::StatusOr<router::ShardTopology> topology;
  for (;;) {
    absl::StatusOr<std::vector<std::string>> addresses =
        router::ResolveShardAddresses(options.shards);
    if (absl::IsInvalidArgument(addresses.status())) return addresses.status();
    topology = addresses.ok()
                   ? router::DiscoverShards(*addresses, options.connection,
                                            absl::Now() + absl::Seconds(5))
                   : addresses.status();
    if (topology.ok() || absl::Now() >= give_up) break;
    RETRACE_LOG(INFO) << "waiting for the shards: "
                      << topology.status().message();
    absl::SleepFor(absl::Seconds(1));
  }
  if (!topology.ok()) return topology.status();
  RETRACE_LOG(INFO) << "store " << topology->info.store_id() << ": "
                    << topology->manifest.num_samples << " samples on "
                    << topology->shards.size() << " shards";
  if (!config_.model_path.empty()) {
    ASSIGN_OR_RETURN(model_featurizer_,
                     service::ModelQueryFeaturizer::Create(
                         topology->manifest, config_.model_path,
                         config_.workers, featurize_device));
    featurizer_ = model_featurizer_.get();
    if (overrides_.wrap_featurizer) {
      wrapped_featurizer_ = overrides_.wrap_featurizer(featurizer_);
      featurizer_ = wrapped_featurizer_.get();
    }
  }
  metrics_->SetStore(topology->manifest.num_samples, topology->store_bytes);
  router_ = std::make_unique<router::RouterEngine>(
      options, std::move(*topology), featurizer_, metrics_.get(),
      overrides_.clock);
  serving_ = router_.get();
  return absl::OkStatus();
}

void ServerStack::WatchShards() {
  bool ready = true;
  std::unique_lock<std::mutex> lock(watch_mutex_);
  while (!watch_stop_.wait_for(lock, absl::ToChronoSeconds(kWatchInterval),
                               [this] { return stopping_; })) {
    lock.unlock();
    const absl::Status status = router_->Watch(absl::Now() + kWatchInterval);
    if (status.ok() != ready) {
      ready = status.ok();
      if (ready) {
        RETRACE_LOG(INFO) << "every shard answers again: serving";
      } else {
        RETRACE_LOG(WARNING) << "not ready: " << status.message();
      }
      server_->SetServing(ready);
      metrics_->SetReady(ready);
    }
    lock.lock();
  }
}

void ServerStack::Start() {
  // Loading is over: its freed blocks go back to the kernel rather than
  // stay kept for reuse (common/allocator.h).
  ReleaseFreedMemory();
  service_->SetEngine(serving_);
  server_->SetServing(true);
  metrics_->SetReady(true);
  if (router_ != nullptr) watcher_ = std::thread([this] { WatchShards(); });
  RETRACE_LOG(INFO) << "serving";
}

void ServerStack::Shutdown(absl::Duration drain) {
  std::call_once(shutdown_once_, [&] {
    {
      std::lock_guard<std::mutex> lock(watch_mutex_);
      stopping_ = true;
    }
    watch_stop_.notify_all();
    if (watcher_.joinable()) watcher_.join();
    if (metrics_ != nullptr) metrics_->SetReady(false);
    if (server_ != nullptr) server_->Shutdown(drain);
    if (service_ != nullptr) service_->StartDraining();
  });
}

int ServerStack::metrics_port() const {
  return endpoint_ != nullptr ? endpoint_->port() : -1;
}

}  // namespace retrace::stack
