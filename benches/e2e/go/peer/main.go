// Command peer is the end-to-end bench's reference line: a KMS v2 server on the upstream
// Kubernetes framework (k8s.io/kms/pkg/service.NewGRPCService, grpc-go) with an in-memory
// AES-256-GCM key, no audit log, no annotations. It stands in for the upstream mock plugin
// (k8s.io/kms internal/plugins/_mock, which makes one PKCS#11 call per request): that one is
// a nested module the Go module proxy does not serve.
//
// Usage: peer -socket PATH (serves until killed).
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"time"

	"k8s.io/kms/pkg/service"
)

type aesGCM struct {
	aead  cipher.AEAD
	keyID string
}

func newAESGCM() (*aesGCM, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	// A key_id that names the key without revealing it.
	sum := sha256.Sum256(key)
	return &aesGCM{aead: aead, keyID: "go-kms-" + hex.EncodeToString(sum[:8])}, nil
}

func (s *aesGCM) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: s.keyID}, nil
}

// Encrypt returns nonce || AES-GCM(seed), the nonce random.
func (s *aesGCM) Encrypt(_ context.Context, _ string, data []byte) (*service.EncryptResponse, error) {
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(data)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return &service.EncryptResponse{Ciphertext: s.aead.Seal(nonce, nonce, data, nil), KeyID: s.keyID}, nil
}

func (s *aesGCM) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	if req.KeyID != s.keyID {
		return nil, fmt.Errorf("unknown key_id %q", req.KeyID)
	}
	n := s.aead.NonceSize()
	if len(req.Ciphertext) < n {
		return nil, fmt.Errorf("ciphertext shorter than a nonce")
	}
	return s.aead.Open(nil, req.Ciphertext[:n], req.Ciphertext[n:], nil)
}

func main() {
	socket := flag.String("socket", "", "the Unix socket to serve on")
	flag.Parse()
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "usage: peer -socket PATH")
		os.Exit(2)
	}
	kms, err := newAESGCM()
	if err != nil {
		fmt.Fprintf(os.Stderr, "peer: %v\n", err)
		os.Exit(1)
	}
	_ = os.Remove(*socket)
	err = service.NewGRPCService(*socket, 10*time.Second, kms).ListenAndServe()
	fmt.Fprintf(os.Stderr, "peer: %v\n", err)
	os.Exit(1)
}
