// Package conn dials the broker: TLS pinned to the broker's CA, a deadline
// on every call, and the admin credential when one is given.
package conn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// KeyExchange is the only TLS key exchange between nodes, pipelines and the
// broker: hybrid X25519 + ML-KEM-768. Releases sealed to a session travel
// inside it, so a recorded connection stays safe against
// harvest-now-decrypt-later even though the session key itself is a TPM's
// P-256 key.
var KeyExchange = []tls.CurveID{tls.X25519MLKEM768}

// DefaultTimeout bounds a broker call when the caller set no deadline.
const DefaultTimeout = 10 * time.Second

// Options says where the broker is and how to trust it.
type Options struct {
	// Addr is host:port of the broker.
	Addr string
	// CAFile is the broker CA certificate (PEM). The broker is trusted only
	// through it, never through the system roots.
	CAFile string
	// AdminTokenFile, if set, holds the admin credential.
	AdminTokenFile string
	// Timeout bounds each call; DefaultTimeout if zero.
	Timeout time.Duration
}

// Dial returns a client connection. gRPC connects lazily, so an unreachable
// broker surfaces on the first call, within its deadline.
func Dial(o Options) (*grpc.ClientConn, error) {
	if o.Addr == "" {
		return nil, errors.New("conn: no broker address configured (--broker)")
	}
	if o.CAFile == "" {
		return nil, errors.New("conn: no broker CA configured (--broker-ca); the broker is only trusted through its own CA")
	}
	pool, err := CAPool(o.CAFile)
	if err != nil {
		return nil, err
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13, CurvePreferences: KeyExchange})),
		grpc.WithChainUnaryInterceptor(deadline(timeout), explain(o.Addr)),
	}
	if o.AdminTokenFile != "" {
		tok, err := os.ReadFile(o.AdminTokenFile)
		if err != nil {
			return nil, fmt.Errorf("conn: admin credential: %w", err)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(strings.TrimSpace(string(tok)))))
	}
	c, err := grpc.NewClient("passthrough:///"+o.Addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("conn: %w", err)
	}
	return c, nil
}

// CAPool reads the broker CA file, the only root the broker is trusted
// through: for TLS, and for the signatures on its wrapping keys.
func CAPool(caFile string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("conn: broker CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("conn: broker CA %s holds no PEM certificate", caFile)
	}
	return pool, nil
}

func deadline(d time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// explain turns transport failures into a sentence naming the broker; the
// broker's own refusals pass through unchanged.
func explain(addr string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err == nil {
			return nil
		}
		st := status.Convert(err)
		switch st.Code().String() {
		case "Unavailable":
			return &Error{Status: st, msg: fmt.Sprintf("broker %s is unreachable: %s", addr, st.Message())}
		case "DeadlineExceeded":
			return &Error{Status: st, msg: fmt.Sprintf("broker %s did not answer in time: %s", addr, st.Message())}
		}
		return &Error{Status: st, msg: st.Message()}
	}
}

// Error is a broker call failure with the broker's words.
type Error struct {
	Status *status.Status
	msg    string
}

func (e *Error) Error() string { return e.msg }

// GRPCStatus lets status.FromError see the original code.
func (e *Error) GRPCStatus() *status.Status { return e.Status }

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }
