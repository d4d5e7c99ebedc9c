// Command client is the end-to-end bench's KMS v2 client. It dials the way kube-apiserver
// v1.37 does (k8s.io/apiserver .../envelope/kmsv2/grpc_service.go: grpc-go, one connection
// over a Unix socket dialer, authority "localhost", insecure credentials, WaitForReady, a
// deadline per call) and takes commands on stdin, one per line, answering each with one
// JSON line on stdout:
//
//	measure encrypt|decrypt CALLERS SECONDS
//	    CALLERS goroutines share the connection, calling back to back for SECONDS:
//	    {"calls":N,"elapsed_ns":T,"latencies_ns":[...]}
//	long CALLS CONNECTIONS EVERY CALLERS
//	    CALLS calls, Encrypt then Decrypt of what came back (checked), in chunks of EVERY
//	    calls; each chunk opens CONNECTIONS new connections, spreads CALLERS goroutines over
//	    them and closes them: {"calls":DONE} after each chunk.
//	calls encrypt|decrypt N
//	    N calls one after another (benches/callgrind.sh): {"sequential":N}
//
// It exits non-zero with a message on stderr on the first failed call.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

const uid = "00000000-0000-0000-0000-000000000000"

var (
	socket      = flag.String("socket", "", "the server's Unix socket")
	callTimeout = flag.Duration("timeout", 3*time.Second, "deadline of each call (kube-apiserver's default)")
	startWait   = flag.Duration("start-wait", 60*time.Second, "how long to wait for the first Status")
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "client: "+format+"\n", args...)
	os.Exit(1)
}

// dial opens one connection as kube-apiserver's NewGRPCService does (without its metrics
// interceptor).
func dial() (*grpc.ClientConn, kmsapi.KeyManagementServiceClient) {
	addr := *socket
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			return net.DialUnix("unix", nil, &net.UnixAddr{Name: addr})
		}),
	)
	if err != nil {
		fail("connecting to %s: %v", addr, err)
	}
	return conn, kmsapi.NewKeyManagementServiceClient(conn)
}

func encrypt(c kmsapi.KeyManagementServiceClient, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), *callTimeout)
	defer cancel()
	return c.Encrypt(ctx, req)
}

func decrypt(c kmsapi.KeyManagementServiceClient, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), *callTimeout)
	defer cancel()
	return c.Decrypt(ctx, req)
}

// measure runs `callers` goroutines calling `op` back to back for `seconds`.
func measure(c kmsapi.KeyManagementServiceClient, op string, callers int, seconds float64,
	enc *kmsapi.EncryptRequest, dec *kmsapi.DecryptRequest) map[string]any {
	until := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	per := make([][]int64, callers)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]int64, 0, 1<<14)
			for time.Now().Before(until) {
				t := time.Now()
				call(c, op, enc, dec)
				lat = append(lat, time.Since(t).Nanoseconds())
			}
			per[i] = lat
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	all := make([]int64, 0)
	for _, l := range per {
		all = append(all, l...)
	}
	return map[string]any{"calls": len(all), "elapsed_ns": elapsed.Nanoseconds(), "latencies_ns": all}
}

// sequential makes n calls one after another (for instruction counts under callgrind).
func sequential(c kmsapi.KeyManagementServiceClient, op string, n int,
	enc *kmsapi.EncryptRequest, dec *kmsapi.DecryptRequest) map[string]any {
	for range n {
		call(c, op, enc, dec)
	}
	return map[string]any{"sequential": n}
}

// call makes one Encrypt or Decrypt and exits on failure.
func call(c kmsapi.KeyManagementServiceClient, op string,
	enc *kmsapi.EncryptRequest, dec *kmsapi.DecryptRequest) {
	var err error
	if op == "encrypt" {
		_, err = encrypt(c, enc)
	} else {
		_, err = decrypt(c, dec)
	}
	if err != nil {
		fail("%s: %v", op, err)
	}
}

// roundTrip encrypts a fresh random seed and decrypts what came back: two calls.
func roundTrip(c kmsapi.KeyManagementServiceClient) {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		fail("random: %v", err)
	}
	e, err := encrypt(c, &kmsapi.EncryptRequest{Plaintext: seed, Uid: uid})
	if err != nil {
		fail("encrypt: %v", err)
	}
	d, err := decrypt(c, &kmsapi.DecryptRequest{
		Ciphertext: e.Ciphertext, Uid: uid, KeyId: e.KeyId, Annotations: e.Annotations,
	})
	if err != nil {
		fail("decrypt: %v", err)
	}
	if !bytes.Equal(d.Plaintext, seed) {
		fail("decrypt returned other bytes than were encrypted")
	}
}

// long makes `calls` calls in chunks of `every`, each chunk on `conns` new connections.
func long(out *json.Encoder, calls, conns, every, callers int) {
	for done := 0; done < calls; {
		chunk := min(every, calls-done)
		clients := make([]kmsapi.KeyManagementServiceClient, conns)
		closers := make([]*grpc.ClientConn, conns)
		for i := range conns {
			closers[i], clients[i] = dial()
		}
		// Round trips of two calls each; an odd chunk rounds up.
		var left atomic.Int64
		left.Store(int64((chunk + 1) / 2))
		var wg sync.WaitGroup
		for i := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for left.Add(-1) >= 0 {
					roundTrip(clients[i%conns])
				}
			}()
		}
		wg.Wait()
		for _, c := range closers {
			c.Close()
		}
		done += (chunk + 1) / 2 * 2
		emit(out, map[string]any{"calls": done})
	}
}

func emit(out *json.Encoder, v any) {
	if err := out.Encode(v); err != nil {
		fail("stdout: %v", err)
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		fail("%q is not a positive integer", s)
	}
	return n
}

func main() {
	flag.Parse()
	if *socket == "" {
		fail("usage: client -socket PATH (commands on stdin)")
	}
	conn, c := dial()
	defer conn.Close()

	// The first Status waits (WaitForReady) for the server to come up.
	ctx, cancel := context.WithTimeout(context.Background(), *startWait)
	status, err := c.Status(ctx, &kmsapi.StatusRequest{})
	cancel()
	if err != nil {
		fail("status: %v", err)
	}
	enc := &kmsapi.EncryptRequest{Plaintext: bytes.Repeat([]byte{7}, 32), Uid: uid}
	sealed, err := encrypt(c, enc)
	if err != nil {
		fail("first encrypt: %v", err)
	}
	dec := &kmsapi.DecryptRequest{
		Ciphertext: sealed.Ciphertext, Uid: uid, KeyId: sealed.KeyId, Annotations: sealed.Annotations,
	}

	out := json.NewEncoder(flushing{bufio.NewWriter(os.Stdout)})
	emit(out, map[string]any{"ready": true, "key_id": status.KeyId})

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 4 && f[0] == "measure" && (f[1] == "encrypt" || f[1] == "decrypt"):
			seconds, err := strconv.ParseFloat(f[3], 64)
			if err != nil || seconds <= 0 {
				fail("%q is not a positive number of seconds", f[3])
			}
			emit(out, measure(c, f[1], atoi(f[2]), seconds, enc, dec))
		case len(f) == 3 && f[0] == "calls" && (f[1] == "encrypt" || f[1] == "decrypt"):
			emit(out, sequential(c, f[1], atoi(f[2]), enc, dec))
		case len(f) == 5 && f[0] == "long":
			long(out, atoi(f[1]), atoi(f[2]), atoi(f[3]), atoi(f[4]))
		default:
			fail("unknown command %q", in.Text())
		}
	}
}

// flushing flushes after every write, so each progress line reaches the bench at once.
type flushing struct{ w *bufio.Writer }

func (f flushing) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil {
		err = f.w.Flush()
	}
	return n, err
}
