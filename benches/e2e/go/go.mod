// The end-to-end bench's Go programs (benches/e2e/main.rs builds them with `go build`):
// client/, a grpc-go KMS v2 client that dials like kube-apiserver, and peer/, a reference
// server on the upstream k8s.io/kms service framework. grpc-go is the version kube-apiserver
// v1.37.2 is built with.
module kms-plugin/benches/e2e/go

go 1.26.0

require (
	google.golang.org/grpc v1.82.1
	k8s.io/kms v0.37.2
)

require (
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
	golang.org/x/text v0.40.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260526163538-3dc84a4a5aaa // indirect
	google.golang.org/protobuf v1.36.12-0.20260120151049-f2248ac996af // indirect
)
