// retraced: wires config → metrics → gRPC server (NOT_SERVING) → store →
// scorer → featurizer → training images → batcher → engine → SERVING, then
// waits for SIGTERM or SIGINT and drains. Everything else lives in the
// libraries; docs/operations.md describes the flags and the lifecycle.
#include <ATen/Parallel.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device.h"
#include "prometheus/registry.h"
#include "server/core/file_util.h"
#include "server/core/logging.h"
#include "server/core/status.h"
#include "server/data/mixture.h"
#include "server/metrics/metrics.h"
#include "server/model/device.h"
#include "server/retraced/config.h"
#include "server/scoring/scorer.h"
#include "server/service/attribution_service.h"
#include "server/service/batcher.h"
#include "server/service/engine.h"
#include "server/service/grpc_server.h"
#include "server/service/model_featurizer.h"
#include "server/service/training_images.h"
#include "server/store/store_reader.h"

namespace retrace::retraced {
namespace {

// The write end of the signal pipe: the one global, because a signal
// handler can reach nothing else.
int g_signal_pipe = -1;

scoring::DeviceChoice Device(const std::string& name) {
  if (name == "cpu") return scoring::DeviceChoice::kCpu;
  if (name == "cuda") return scoring::DeviceChoice::kCuda;
  return scoring::DeviceChoice::kAuto;
}

// The loaded parts of a serving server, in construction order (destroyed in
// reverse).
struct Loaded {
  std::unique_ptr<store::StoreReader> store;
  std::unique_ptr<scoring::Scorer> scorer;
  std::unique_ptr<service::QueryFeaturizer> featurizer;
  std::unique_ptr<service::TrainingImages> images;
  std::unique_ptr<service::Batcher> batcher;
  std::unique_ptr<service::AttributionEngine> engine;
};

absl::Status Load(const ServerConfig& config, metrics::Metrics* metrics,
                  Loaded* loaded) {
  // First, so that `--featurize-device cuda` without CUDA stops start-up
  // before the store is read.
  ASSIGN_OR_RETURN(model::DeviceChoice featurize_device,
                   model::ParseDeviceChoice(config.featurize_device));
  ASSIGN_OR_RETURN(featurize_device, model::ResolveDevice(featurize_device));
  store::StoreReader::Options store_options;
  store_options.verify_checksums = config.verify_checksums;
  ASSIGN_OR_RETURN(loaded->store,
                   store::StoreReader::Open(config.store_dir, store_options));
  RETRACE_LOG(INFO) << "store " << loaded->store->manifest().store_id << ": "
                    << loaded->store->num_samples() << " samples, "
                    << loaded->store->total_vector_bytes() << " bytes";
  scoring::ScorerOptions scorer_options;
  scorer_options.device = Device(config.device);
  scorer_options.cpu_threads = config.threads;
  // Scratch for the largest batch the batcher will form, reserved at start-up.
  scorer_options.max_batch = config.max_batch;
  ASSIGN_OR_RETURN(loaded->scorer, scoring::Scorer::Create(loaded->store.get(),
                                                           scorer_options));
  RETRACE_LOG(INFO) << "scoring on "
                    << kernels::BackendName(loaded->scorer->backend());
  if (!config.model_path.empty()) {
    ASSIGN_OR_RETURN(loaded->featurizer,
                     service::ModelQueryFeaturizer::Create(
                         loaded->store->manifest(), config.model_path,
                         config.workers, featurize_device));
    RETRACE_LOG(INFO) << "featurizing queries on "
                      << model::DeviceChoiceName(featurize_device);
  } else {
    RETRACE_LOG(INFO) << "no --model: serving precomputed query vectors only";
  }
  if (config.thumbnails) {
    const data::DataLocations locations =
        data::DataLocationsFrom(config.fashion_mnist_dir, config.mnist_dir);
    absl::StatusOr<std::unique_ptr<service::TrainingImages>> images =
        service::LoadTrainingImages(*loaded->store, locations);
    if (images.ok()) {
      loaded->images = std::move(*images);
    } else {
      RETRACE_LOG(WARNING) << "serving without thumbnails: "
                           << images.status().message();
    }
  }
  service::BatcherOptions batcher_options;
  batcher_options.max_batch = config.max_batch;
  batcher_options.max_queue_delay_us = config.max_queue_delay_us;
  batcher_options.max_queue = config.max_queue;
  RETURN_IF_ERROR(service::Batcher::CheckOptions(batcher_options));
  scoring::Scorer* scorer = loaded->scorer.get();
  loaded->batcher = std::make_unique<service::Batcher>(
      [scorer](const std::vector<scoring::ScoreQuery>& batch) {
        return scorer->Score(batch);
      },
      batcher_options, metrics);
  service::EngineParts parts;
  parts.store = loaded->store.get();
  parts.shape = loaded->scorer->shape();
  parts.backend = kernels::BackendName(loaded->scorer->backend());
  parts.batcher = loaded->batcher.get();
  parts.featurizer = loaded->featurizer.get();
  parts.images = loaded->images.get();
  parts.metrics = metrics;
  loaded->engine = std::make_unique<service::AttributionEngine>(parts);
  metrics->SetStore(loaded->store->num_samples(),
                    loaded->store->total_vector_bytes());
  metrics->SetDeviceMemory(loaded->scorer->device_bytes());
  return absl::OkStatus();
}

int Run(const ServerConfig& config) {
  // SIGTERM and SIGINT only write to a pipe (whichever thread takes them);
  // the main thread reads it once serving.
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    std::cerr << "retraced: pipe: " << std::strerror(errno) << "\n";
    return 1;
  }
  g_signal_pipe = pipe_fds[1];
  struct sigaction action {};
  action.sa_handler = [](int signal) {
    const char byte = static_cast<char>(signal);
    [[maybe_unused]] ssize_t n = write(g_signal_pipe, &byte, 1);
  };
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  if (config.threads > 0) at::set_num_threads(config.threads);

  auto registry = std::make_shared<prometheus::Registry>();
  metrics::Metrics metrics(*registry);
  std::unique_ptr<metrics::MetricsEndpoint> endpoint;
  if (config.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> started =
        metrics::MetricsEndpoint::Start(
            absl::StrCat(config.metrics_host, ":", config.metrics_port),
            registry);
    if (!started.ok()) {
      std::cerr << "retraced: metrics: " << started.status().message() << "\n";
      return 1;
    }
    endpoint = std::move(*started);
    RETRACE_LOG(INFO) << "metrics on port " << endpoint->port();
  }

  service::ServiceOptions service_options;
  service_options.max_concurrent = config.max_concurrent;
  if (!config.token_file.empty()) {
    absl::StatusOr<std::vector<std::string>> tokens =
        service::LoadTokenFile(config.token_file);
    if (!tokens.ok()) {
      std::cerr << "retraced: " << tokens.status().message() << "\n";
      return 1;
    }
    service_options.tokens = std::move(*tokens);
  }
  service::AttributionService service(service_options, &metrics);

  service::GrpcServerOptions server_options;
  server_options.listen = config.listen;
  server_options.tls_cert_file = config.tls_cert;
  server_options.tls_key_file = config.tls_key;
  server_options.tls_client_ca_file = config.tls_client_ca;
  server_options.max_message_bytes = config.max_message_bytes;
  absl::StatusOr<std::unique_ptr<service::GrpcServer>> server =
      service::GrpcServer::Start(server_options, &service);
  if (!server.ok()) {
    std::cerr << "retraced: " << server.status().message() << "\n";
    return 1;
  }
  RETRACE_LOG(INFO) << "listening on port " << (*server)->port()
                    << ((*server)->tls() ? " (TLS)" : "")
                    << "; loading (health NOT_SERVING)";
  if (!config.port_file.empty()) {
    absl::Status written = WriteFileAtomically(
        config.port_file, absl::StrCat((*server)->port(), "\n"));
    if (!written.ok()) {
      std::cerr << "retraced: " << written.message() << "\n";
      return 1;
    }
  }

  Loaded loaded;
  if (absl::Status status = Load(config, &metrics, &loaded); !status.ok()) {
    std::cerr << "retraced: " << status << "\n";
    (*server)->Shutdown(absl::ZeroDuration());
    return 1;
  }
  service.SetEngine(loaded.engine.get());
  (*server)->SetServing(true);
  metrics.SetReady(true);
  RETRACE_LOG(INFO) << "serving";

  char signal = 0;
  while (read(pipe_fds[0], &signal, 1) < 0 && errno == EINTR) {
  }
  RETRACE_LOG(INFO) << "signal " << int{signal} << ": draining (up to "
                    << config.drain_timeout_s << " s)";
  metrics.SetReady(false);
  (*server)->Shutdown(absl::Seconds(config.drain_timeout_s));
  service.StartDraining();
  RETRACE_LOG(INFO) << "stopped";
  return 0;
}

}  // namespace
}  // namespace retrace::retraced

int main(int argc, char** argv) {
  retrace::retraced::ServerConfig config;
  if (std::optional<int> exit = retrace::retraced::ParseServerConfig(
          argc, argv, &config, std::cout, std::cerr)) {
    return *exit;
  }
  return retrace::retraced::Run(config);
}
