// The configuration of a serving process: what retraced's flags and TOML
// file set (server/retraced/config.h parses them) and what ServerStack
// (server_stack.h) is built from. Defaults are retraced's.
#ifndef RETRACE_SERVER_STACK_SERVER_CONFIG_H_
#define RETRACE_SERVER_STACK_SERVER_CONFIG_H_

#include <cstdint>
#include <string>

namespace retrace::stack {

struct ServerConfig {
  // What this process is: "single" (the whole store), "shard" (part
  // shard_part of it) or "router" (no store; fans out to `shards`).
  std::string role = "single";
  std::string shard_part;  // "I/N", role shard
  std::string shards;      // router/shard_set.h's spec, role router
  double shard_timeout_s = 10;
  std::string shard_ca;          // PEM CA of the shards' certificates
  std::string shard_token_file;  // its first token is sent to the shards
  // What to serve.
  std::string store_dir;
  // Model description (file, or a folder holding model.toml, such as a
  // retrace-batch train run); empty: precomputed query vectors only.
  std::string model_path;
  std::string fashion_mnist_dir;
  std::string mnist_dir;
  bool thumbnails = true;
  bool verify_checksums = true;
  // Where.
  std::string listen = "0.0.0.0:50051";
  int metrics_port = 9464;  // 0: any free port; -1: no metrics endpoint
  std::string metrics_host = "0.0.0.0";
  std::string port_file;  // written with the bound gRPC port once listening
  // Resources.
  std::string device = "auto";  // the scan's: auto, cpu, cuda
  // Where query featurization (the model's forward and backward passes)
  // runs: auto, cpu, cuda (server/model/device.h). Separate from `device`:
  // a GPU scan with a CPU featurizer, or the reverse, are both valid.
  std::string featurize_device = "auto";
  int workers = 1;  // concurrent query featurizations
  int threads = 0;  // LibTorch and scan threads; 0: all cores
  // Batching and limits.
  int max_batch = 32;
  int64_t max_queue_delay_us = 2000;
  int max_queue = 256;
  int max_concurrent = 64;
  int64_t max_message_bytes = int64_t{64} << 20;
  // Security.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  std::string token_file;
  // Shutdown.
  double drain_timeout_s = 30;
};

}  // namespace retrace::stack

#endif  // RETRACE_SERVER_STACK_SERVER_CONFIG_H_
