// The gRPC server around the attribution service: listening address, TLS or
// mutual TLS from PEM files, message size limits, the standard
// grpc.health.v1.Health service and server reflection.
//
//   ASSIGN_OR_RETURN(auto server, GrpcServer::Start(options, &service));
//   ...load...; server->SetServing(true);
//   ...SIGTERM...; server->Shutdown(absl::Seconds(30));
//
// Health reports NOT_SERVING from Start until SetServing(true), and again from
// Shutdown on. Thread safety: SetServing and Shutdown may be called from any
// thread; Shutdown at most once.
#ifndef RETRACE_SERVER_SERVICE_GRPC_SERVER_H_
#define RETRACE_SERVER_SERVICE_GRPC_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace retrace::service {

inline constexpr char kServiceName[] = "retrace.v1.Attribution";

struct GrpcServerOptions {
  std::string listen = "0.0.0.0:50051";  // port 0 picks a free port
  // TLS when both are set; mutual TLS (client certificates required and
  // verified) when tls_client_ca_file is set too.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  int64_t max_message_bytes = int64_t{64} << 20;  // receive and send
};

class GrpcServer {
 public:
  // InvalidArgument: inconsistent TLS options or unreadable PEM files (naming
  // them); Unavailable: cannot listen on the address. `service` must outlive
  // the server.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(
      const GrpcServerOptions& options, grpc::Service* service);
  ~GrpcServer();

  int port() const { return port_; }
  bool tls() const { return tls_; }

  void SetServing(bool serving);
  // Health goes NOT_SERVING, new calls are refused and calls in flight get up
  // to `drain` to finish; then the rest are cancelled. Returns when every
  // handler has returned.
  void Shutdown(absl::Duration drain);

 private:
  GrpcServer() = default;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool tls_ = false;
  bool shut_down_ = false;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_GRPC_SERVER_H_
