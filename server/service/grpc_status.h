// The one place where absl::Status and grpc::Status meet (one status type
// inside, converted at the boundary: the service's answers, a router's calls
// to its shards). The codes are the same
// google.rpc.Code values, so the conversion keeps code and message.
#ifndef RETRACE_SERVER_SERVICE_GRPC_STATUS_H_
#define RETRACE_SERVER_SERVICE_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace retrace::service {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// "OK", "INVALID_ARGUMENT", ...: the name used in metrics labels and logs.
std::string CodeName(grpc::StatusCode code);

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_GRPC_STATUS_H_
