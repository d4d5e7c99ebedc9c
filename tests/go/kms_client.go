// Command kms_client talks to a KMS v2 plugin exactly the way kube-apiserver does
// (grpc-go, Unix socket, WaitForReady, 3 s deadlines) and applies the apiserver's
// validation to every response. It exits non-zero with a message on the first failure.
//
// Built by tests/interop.rs in GOPATH mode against Debian's grpc-go, with stubs
// generated from proto/kms_v2.proto at test time (package kms-plugin/tests/go/kmsv2).
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"

	kmsv2 "kms-plugin/tests/go/kmsv2"
)

const (
	maxLen            = 1024
	maxAnnotationSize = 32 * 1024
	callTimeout       = 3 * time.Second
)

// An RFC 1123 label as the apiserver's FQDN check accepts it.
var labelRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// validFQDN mirrors the apiserver's annotation key rule (KMSV2.md §2).
func validFQDN(key string) error {
	name := strings.TrimSuffix(key, ".")
	if name == "" {
		return fmt.Errorf("empty")
	}
	if len(name) > 253 {
		return fmt.Errorf("longer than 253 characters")
	}
	if strings.Contains(name, "/") {
		return fmt.Errorf("contains '/'")
	}
	labels := strings.Split(name, ".")
	if len(labels) < 2 {
		return fmt.Errorf("fewer than two labels")
	}
	for _, l := range labels {
		if len(l) > 63 {
			return fmt.Errorf("label %q longer than 63 characters", l)
		}
		if !labelRE.MatchString(l) {
			return fmt.Errorf("label %q is not a lowercase RFC 1123 label", l)
		}
	}
	return nil
}

func checkKeyID(what, keyID string) error {
	if keyID == "" {
		return fmt.Errorf("%s: key_id is empty", what)
	}
	if len(keyID) > maxLen {
		return fmt.Errorf("%s: key_id is %d bytes (> %d)", what, len(keyID), maxLen)
	}
	return nil
}

// checkStatus applies the Status checks; wantVersion "" accepts what 1.29+ accept,
// "v2beta1" is what 1.27 and 1.28 require.
func checkStatus(r *kmsv2.StatusResponse, wantVersion string) error {
	if r.Healthz != "ok" {
		return fmt.Errorf("status: healthz = %q, want \"ok\"", r.Healthz)
	}
	if wantVersion != "" && r.Version != wantVersion {
		return fmt.Errorf("status: version = %q, want %q", r.Version, wantVersion)
	}
	if r.Version != "v2" && r.Version != "v2beta1" {
		return fmt.Errorf("status: version = %q, want \"v2\" or \"v2beta1\"", r.Version)
	}
	return checkKeyID("status", r.KeyId)
}

func checkEncrypt(r *kmsv2.EncryptResponse, statusKeyID string) error {
	if len(r.Ciphertext) == 0 {
		return fmt.Errorf("encrypt: ciphertext is empty")
	}
	if len(r.Ciphertext) > maxLen {
		return fmt.Errorf("encrypt: ciphertext is %d bytes (> %d)", len(r.Ciphertext), maxLen)
	}
	if err := checkKeyID("encrypt", r.KeyId); err != nil {
		return err
	}
	if r.KeyId != statusKeyID {
		return fmt.Errorf("encrypt: key_id %q != status key_id %q", r.KeyId, statusKeyID)
	}
	total := 0
	for k, v := range r.Annotations {
		if err := validFQDN(k); err != nil {
			return fmt.Errorf("encrypt: annotation key %q is not a valid FQDN: %v", k, err)
		}
		total += len(k) + len(v)
	}
	if total > maxAnnotationSize {
		return fmt.Errorf("encrypt: annotations are %d bytes (> %d)", total, maxAnnotationSize)
	}
	return nil
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := rand.Read(b)
	return b, err
}

// uuid returns a random (version 4) UUID, like the apiserver's per-call uid.
func uuid() (string, error) {
	b, err := randomBytes(16)
	if err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// dial is kube-apiserver's kmsv2 dial (grpc_service.go): the target is the socket path
// with "unix://" stripped (an abstract socket stays "@name"), dialed as "unix".
func dial(socket, authority string) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	}
	// 1.32+ sets "localhost"; 1.27-1.31 set nothing, so grpc-go sends the path.
	if authority != "" {
		opts = append(opts, grpc.WithAuthority(authority))
	}
	return grpc.Dial(socket, opts...)
}

func call(f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return f(ctx)
}

func run(socket, authority, wantVersion string, n int) error {
	conn, err := dial(socket, authority)
	if err != nil {
		return fmt.Errorf("dial %s: %v", socket, err)
	}
	defer conn.Close()
	client := kmsv2.NewKeyManagementServiceClient(conn)

	// All calls share one connection, so later header blocks use HPACK dynamic
	// table references to the :authority the first one inserted.
	for i := 0; i < n; i++ {
		var status *kmsv2.StatusResponse
		if err := call(func(ctx context.Context) (e error) {
			status, e = client.Status(ctx, &kmsv2.StatusRequest{})
			return
		}); err != nil {
			return fmt.Errorf("round %d: status: %v", i, err)
		}
		if err := checkStatus(status, wantVersion); err != nil {
			return fmt.Errorf("round %d: %v", i, err)
		}

		seed, err := randomBytes(32)
		if err != nil {
			return err
		}
		uid, err := uuid()
		if err != nil {
			return err
		}
		var sealed *kmsv2.EncryptResponse
		if err := call(func(ctx context.Context) (e error) {
			sealed, e = client.Encrypt(ctx, &kmsv2.EncryptRequest{Plaintext: seed, Uid: uid})
			return
		}); err != nil {
			return fmt.Errorf("round %d: encrypt: %v", i, err)
		}
		if err := checkEncrypt(sealed, status.KeyId); err != nil {
			return fmt.Errorf("round %d: %v", i, err)
		}

		if uid, err = uuid(); err != nil {
			return err
		}
		var opened *kmsv2.DecryptResponse
		if err := call(func(ctx context.Context) (e error) {
			opened, e = client.Decrypt(ctx, &kmsv2.DecryptRequest{
				Ciphertext:  sealed.Ciphertext,
				Uid:         uid,
				KeyId:       sealed.KeyId,
				Annotations: sealed.Annotations,
			})
			return
		}); err != nil {
			return fmt.Errorf("round %d: decrypt: %v", i, err)
		}
		if !bytes.Equal(opened.Plaintext, seed) {
			return fmt.Errorf("round %d: decrypt returned %x, want %x", i, opened.Plaintext, seed)
		}
	}
	return nil
}

func main() {
	socket := flag.String("socket", "", "socket path or @name (abstract), optionally as unix:///path or unix:///@name")
	authority := flag.String("authority", "", "value for grpc.WithAuthority; empty sends the socket path like apiserver 1.27-1.31")
	version := flag.String("version", "", "require this Status version (\"v2beta1\" for apiserver 1.27/1.28); empty accepts v2 or v2beta1")
	n := flag.Int("n", 5, "Status+Encrypt+Decrypt rounds on one connection")
	flag.Parse()
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "kms_client: -socket is required")
		os.Exit(2)
	}
	// The apiserver's parseEndpoint: "unix:///path" -> "/path", "unix:///@name" -> "@name".
	target := strings.TrimPrefix(*socket, "unix://")
	if strings.HasPrefix(target, "/@") {
		target = target[1:]
	}
	if err := run(target, *authority, *version, *n); err != nil {
		fmt.Fprintf(os.Stderr, "kms_client (grpc-go, authority=%q): FAIL: %v\n", *authority, err)
		os.Exit(1)
	}
	fmt.Printf("kms_client (grpc-go, authority=%q): %d rounds ok\n", *authority, *n)
}
