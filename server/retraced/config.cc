#include "server/retraced/config.h"

#include <toml++/toml.h>

#include <CLI/CLI.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace retrace::retraced {
namespace {

void Describe(CLI::App* app, ServerConfig* c) {
  app->description(
      "retraced: the retrace attribution server. Serves one gradient store "
      "over gRPC (retrace.v1.Attribution, grpc.health.v1.Health, reflection) "
      "and Prometheus metrics over HTTP.");
  app->add_option("--config",
                  "TOML file of options (keys = long flag names "
                  "without '--'); flags override it");
  app->add_option("--store", c->store_dir,
                  "Store directory to serve (roles single and shard)");
  app->add_option("--role", c->role,
                  "single: serve the whole store; shard: serve part "
                  "--shard-part of it behind a router; router: serve no "
                  "vectors, fan requests out to --shards and merge their "
                  "answers (docs/operations.md, \"Scale-out\")")
      ->check(CLI::IsMember({"single", "shard", "router"}))
      ->capture_default_str();
  app->add_option("--shard-part", c->shard_part,
                  "Role shard: serve part I/N of the store's shard files, the "
                  "same split as retrace-batch build-store --shard I/N");
  app->add_option("--shards", c->shards,
                  "Role router: the shards, host:port,host:port or "
                  "dns:///NAME:PORT (every address the name resolves to, "
                  "e.g. a Kubernetes headless Service)");
  app->add_option("--shard-timeout-s", c->shard_timeout_s,
                  "Role router: the longest a shard may take for one call")
      ->check(CLI::Range(0.001, 3600.0))
      ->capture_default_str();
  app->add_option("--shard-ca", c->shard_ca,
                  "Role router: PEM CA of the shards' TLS certificates "
                  "(default: plaintext to the shards)");
  app->add_option("--shard-token-file", c->shard_token_file,
                  "Role router: a file whose first token the router sends to "
                  "the shards as 'authorization: Bearer <token>'");
  app->add_option("--model,--run", c->model_path,
                  "Model description of the store's model (model.toml, or a "
                  "folder holding one such as a retrace-batch train run); "
                  "without it only precomputed query_vectors are accepted");
  app->add_option("--fashion-mnist-dir", c->fashion_mnist_dir,
                  "Fashion-MNIST IDX directory, for thumbnails (default: "
                  "Debian's dataset-fashion-mnist)");
  app->add_option("--mnist-dir", c->mnist_dir,
                  "MNIST JSON directory, for thumbnails (default: the "
                  "fetch_data.sh cache)");
  app->add_flag("--thumbnails,!--no-thumbnails", c->thumbnails,
                "Read the training images named by the store's manifest for "
                "thumbnails and label names (default: on)");
  app->add_flag("--verify-checksums,!--no-verify-checksums",
                c->verify_checksums,
                "Hash every shard at start-up and compare with the manifest "
                "(default: on)");
  app->add_option("--listen", c->listen, "gRPC address (port 0: any free port)")
      ->capture_default_str();
  app->add_option("--metrics-port", c->metrics_port,
                  "Prometheus /metrics port (0: any free port, -1: off)")
      ->capture_default_str();
  app->add_option("--metrics-host", c->metrics_host,
                  "Address the metrics endpoint binds")
      ->capture_default_str();
  app->add_option("--port-file", c->port_file,
                  "Write the bound gRPC port to this file once listening");
  app->add_option("--device", c->device,
                  "Scoring (scan) device; the store lives there")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--featurize-device", c->featurize_device,
                  "Query featurization device (the model's gradients): auto "
                  "(CUDA when LibTorch has it and a GPU is present), cpu or "
                  "cuda; the projection runs on the CPU")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--workers", c->workers,
                  "Query featurizations that run at once (each holds a copy "
                  "of every checkpoint)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app->add_option("--threads", c->threads,
                  "LibTorch intra-op and CPU scan threads (0: all cores)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app->add_option("--max-batch", c->max_batch,
                  "Queries scored together in one scan")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app->add_option("--max-queue-delay-us", c->max_queue_delay_us,
                  "Longest a query waits for its batch to fill (µs)")
      ->check(CLI::Range(int64_t{0}, int64_t{60000000}))
      ->capture_default_str();
  app->add_option("--max-queue", c->max_queue,
                  "Queued queries beyond which requests get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app->add_option("--max-concurrent", c->max_concurrent,
                  "Requests processed at once beyond which requests get "
                  "RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app->add_option("--max-message-bytes", c->max_message_bytes,
                  "Largest gRPC message received or sent")
      ->check(CLI::Range(int64_t{1024}, int64_t{2147483647}))
      ->capture_default_str();
  app->add_option("--tls-cert", c->tls_cert,
                  "PEM certificate chain: serve TLS (with --tls-key)");
  app->add_option("--tls-key", c->tls_key, "PEM private key of --tls-cert");
  app->add_option("--tls-client-ca", c->tls_client_ca,
                  "PEM CA: require client certificates signed by it (mTLS)");
  app->add_option("--token-file", c->token_file,
                  "Bearer tokens, one per line ('#' comments): require "
                  "'authorization: Bearer <token>' on every call");
  app->add_option("--drain-timeout-s", c->drain_timeout_s,
                  "On SIGTERM, how long requests in flight get to finish")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
}

// What the role needs and refuses, or "" when the options fit it.
std::string RoleProblem(const ServerConfig& c) {
  if (c.role == "router") {
    if (c.shards.empty()) return "--role router needs --shards";
    if (!c.store_dir.empty()) {
      return "--role router serves no store: drop --store (the shards "
             "serve it)";
    }
    return "";
  }
  if (c.store_dir.empty()) return "--store is required";
  if (!c.shards.empty()) return "--shards is for --role router";
  if (c.role == "shard") {
    if (c.shard_part.empty()) return "--role shard needs --shard-part I/N";
    if (!c.model_path.empty()) {
      return "--role shard takes precomputed query vectors only: drop "
             "--run (the router featurizes)";
    }
  } else if (!c.shard_part.empty()) {
    return "--shard-part is for --role shard";
  }
  return "";
}

// "--key=value" arguments from a TOML file, or an error naming file and key.
bool TomlArguments(const std::string& path, const CLI::App& app,
                   std::vector<std::string>* args, std::ostream& err) {
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    err << "retraced: config file " << path << ": " << e.description() << " ("
        << where.str() << ")\n";
    return false;
  }
  for (const auto& [key, node] : table) {
    const std::string name(key.str());
    const std::string flag = "--" + name;
    if (name == "config" || app.get_option_no_throw(flag) == nullptr) {
      err << "retraced: config file " << path << ": unknown key '" << name
          << "'\n";
      return false;
    }
    std::string value;
    if (const auto* s = node.as_string()) {
      value = s->get();
    } else if (const auto* i = node.as_integer()) {
      value = std::to_string(i->get());
    } else if (const auto* f = node.as_floating_point()) {
      std::ostringstream text;
      text << f->get();
      value = text.str();
    } else if (const auto* b = node.as_boolean()) {
      value = b->get() ? "true" : "false";
    } else {
      err << "retraced: config file " << path << ": key '" << name
          << "' must be a string, number or boolean\n";
      return false;
    }
    args->push_back(flag + "=" + value);
  }
  return true;
}

}  // namespace

std::optional<int> ParseServerConfig(int argc, const char* const* argv,
                                     ServerConfig* config, std::ostream& out,
                                     std::ostream& err) {
  CLI::App app{"", "retraced"};
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  Describe(&app, config);

  // The file's values go first so that the command line overrides them.
  std::vector<std::string> args;
  std::string config_file;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) config_file = argv[i + 1];
    if (a.rfind("--config=", 0) == 0) config_file = a.substr(9);
  }
  if (!config_file.empty() && !TomlArguments(config_file, app, &args, err)) {
    return 2;
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);  // CLI11 takes the arguments in reverse order
  } catch (const CLI::CallForHelp&) {
    out << app.help();
    return 0;
  } catch (const CLI::ParseError& e) {
    err << "retraced: " << e.what() << "\n";
    return 2;
  }
  if (const std::string problem = RoleProblem(*config); !problem.empty()) {
    err << "retraced: " << problem << "\n";
    return 2;
  }
  return std::nullopt;
}

}  // namespace retrace::retraced
