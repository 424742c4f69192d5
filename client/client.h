// retrace_client: a thin, blocking gRPC client of retraced
// (retrace.v1.Attribution and grpc.health.v1.Health). No LibTorch: it only
// moves messages.
//
//   ConnectionOptions options;
//   options.server = "gpu-node:50051";
//   options.token = "s3cret";
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Create(options));
//   ASSIGN_OR_RETURN(v1::AttributeResponse response, client->Attribute(req));
//
// Errors: every call returns the server's gRPC status as an absl::Status with
// the same code and message (this file is the one place where grpc::Status
// becomes absl::Status). Create fails only on local problems (unreadable PEM
// or token files, inconsistent TLS options); it does not contact the server.
//
// Thread safety: a Client may be used from several threads at once.
#ifndef RETRACE_CLIENT_CLIENT_H_
#define RETRACE_CLIENT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "retrace/v1/attribution.grpc.pb.h"

namespace retrace::client {

struct ConnectionOptions {
  std::string server = "localhost:50051";  // HOST:PORT, or any gRPC target
  // TLS with the system's root certificates, or with ca_file's when set.
  // Setting ca_file or cert_file implies TLS.
  bool tls = false;
  std::string ca_file;    // PEM roots that sign the server's certificate
  std::string cert_file;  // PEM client certificate (mutual TLS), with key_file
  std::string key_file;   // PEM private key of cert_file
  // Name checked against the server's certificate instead of the host in
  // `server` (e.g. a certificate for "retraced" reached through an IP).
  std::string tls_server_name;
  // Sent as "authorization: Bearer <token>" on every call; empty: none.
  std::string token;
  // Deadline of each call, from its start; zero or infinite: none.
  absl::Duration timeout = absl::ZeroDuration();
  // Largest response accepted (thumbnails of k = 4096 samples are large).
  int32_t max_receive_bytes = 64 << 20;
};

// Reads a bearer token file in the server's format: the first line that is
// neither blank nor a '#' comment, surrounding whitespace trimmed. NotFound
// when the file does not exist, InvalidArgument when it holds no token; the
// message names the path.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// grpc.health.v1.HealthCheckResponse.ServingStatus, by value.
enum class ServingStatus {
  kUnknown = 0,
  kServing = 1,
  kNotServing = 2,
  kServiceUnknown = 3,
};
// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN".
absl::string_view ServingStatusName(ServingStatus status);

// "TRACIN" -> "tracin"-style lower-case name of a method ("tracin", "retrac",
// "unspecified") as used on the command line and in the JSON output.
absl::string_view MethodName(v1::Method method);
// Display name: "TracIn", "ReTrac".
absl::string_view MethodTitle(v1::Method method);

class Client {
 public:
  // Builds the channel (lazily connected: an unreachable server shows up as
  // UNAVAILABLE on the first call). InvalidArgument / NotFound naming the
  // file for unreadable or inconsistent TLS material.
  static absl::StatusOr<std::unique_ptr<Client>> Create(
      const ConnectionOptions& options);

  absl::StatusOr<v1::AttributeResponse> Attribute(
      const v1::AttributeRequest& request) const;
  absl::StatusOr<v1::SelfInfluenceResponse> SelfInfluence(
      const v1::SelfInfluenceRequest& request) const;
  // The `count` most self-influential samples (fewer when the store is
  // smaller), fetched in pages of at most `page_size` (0: the server's
  // default). Each page is one call with its own deadline.
  absl::StatusOr<std::vector<v1::AttributedSample>> TopSelfInfluence(
      v1::Method method, int64_t count, int32_t page_size) const;
  absl::StatusOr<v1::StoreInfo> GetStoreInfo() const;
  // grpc.health.v1.Health/Check; `service` empty asks about the whole
  // server. A server that does not know `service` answers NOT_FOUND.
  absl::StatusOr<ServingStatus> CheckHealth(absl::string_view service) const;

 private:
  Client(ConnectionOptions options, std::shared_ptr<grpc::Channel> channel);
  // A context carrying the deadline and the bearer token.
  std::unique_ptr<grpc::ClientContext> NewContext() const;

  const ConnectionOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::Attribution::Stub> stub_;
};

// grpc::Status -> absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace retrace::client

#endif  // RETRACE_CLIENT_CLIENT_H_
