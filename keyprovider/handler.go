// Package keyprovider speaks ocicrypt's keyprovider protocol, over exec
// (one JSON request on stdin, one reply on stdout) and gRPC, with one
// handler: it wraps layer keys for broker keys at build time and has the
// broker release them to an attested node at pull time.
package keyprovider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	ocikp "github.com/containers/ocicrypt/keywrap/keyprovider"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// DefaultName is the provider name users type after "provider:".
const DefaultName = "attested"

// MaxRequest bounds a request; real ones are a few KiB.
const MaxRequest = 1 << 20

// KeySource returns the public part of a broker key, for wrapping.
type KeySource interface {
	WrappingKey(ctx context.Context, name string) (*apiv1.WrappingKey, error)
}

// Unwrapper recovers optsdata from one of our annotations: a parsed
// document and its bytes exactly as stored on the layer.
type Unwrapper interface {
	Unwrap(ctx context.Context, a annotation.Annotation, raw []byte) ([]byte, error)
}

// Handler serves keywrap and keyunwrap. Either part may be nil on a host
// that only builds or only pulls; the matching operation then fails clearly.
type Handler struct {
	// Name is the provider name in the ocicrypt config ("attested").
	Name      string
	Keys      KeySource
	Unwrapper Unwrapper
}

// inputError marks malformed requests, so gRPC can say InvalidArgument.
type inputError struct{ err error }

func (e inputError) Error() string { return e.err.Error() }
func (e inputError) Unwrap() error { return e.err }

func errInput(err error) error { return inputError{err} }

// Handle serves one request and returns the JSON reply.
func (h *Handler) Handle(ctx context.Context, in []byte) ([]byte, error) {
	if len(in) > MaxRequest {
		return nil, errInput(fmt.Errorf("request is %d bytes, limit %d", len(in), MaxRequest))
	}
	if len(bytes.TrimSpace(in)) == 0 {
		return nil, errInput(errors.New("the request is empty: ocicrypt sends one JSON keyprovider request on standard input"))
	}
	var req ocikp.KeyProviderKeyWrapProtocolInput
	if err := json.Unmarshal(in, &req); err != nil {
		// The JSON error may quote input bytes; say only where it broke.
		return nil, errInput(fmt.Errorf("request is not valid keyprovider JSON: %s", jsonErrorPlace(err)))
	}
	var out ocikp.KeyProviderKeyWrapProtocolOutput
	switch req.Operation {
	case ocikp.OpKeyWrap:
		a, err := h.wrap(ctx, req.KeyWrapParams)
		if err != nil {
			return nil, err
		}
		out.KeyWrapResults.Annotation = a
	case ocikp.OpKeyUnwrap:
		o, err := h.unwrap(ctx, req.KeyUnwrapParams)
		if err != nil {
			return nil, err
		}
		out.KeyUnwrapResults.OptsData = o
	default:
		return nil, errInput(fmt.Errorf("unknown operation %q (want keywrap or keyunwrap)", req.Operation))
	}
	return json.Marshal(out)
}

func jsonErrorPlace(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("syntax error at byte %d", syn.Offset)
	case errors.As(err, &typ):
		return fmt.Sprintf("field %q has the wrong type (binary values must be padded standard base64)", typ.Field)
	}
	// Base64 errors name a byte offset only; keep the library wording.
	return err.Error()
}

func (h *Handler) name() string {
	if h.Name == "" {
		return DefaultName
	}
	return h.Name
}

func (h *Handler) wrap(ctx context.Context, p ocikp.KeyWrapParams) ([]byte, error) {
	if len(p.OptsData) == 0 {
		return nil, errInput(errors.New("keywrap request carries no optsdata"))
	}
	if p.Ec == nil {
		return nil, errInput(errors.New("keywrap request carries no encryption config"))
	}
	values, ok := p.Ec.Parameters[h.name()]
	if !ok {
		return nil, errInput(fmt.Errorf("keywrap request has no parameters for provider %q (is the provider named differently in the ocicrypt config?)", h.name()))
	}
	names, err := keyNames(values)
	if err != nil {
		return nil, err
	}
	if h.Keys == nil {
		return nil, errors.New("this host is not configured to wrap (no broker address)")
	}
	var broker string
	var rs []annotation.Recipient
	for _, name := range names {
		wk, err := h.Keys.WrappingKey(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("wrap for key %s: %w", name, err)
		}
		if broker != "" && wk.GetBrokerId() != broker {
			return nil, fmt.Errorf("keys %s and %s belong to different brokers", names[0], name)
		}
		broker = wk.GetBrokerId()
		st, err := suite.Lookup(wk.GetSuite())
		if err != nil {
			return nil, fmt.Errorf("wrap for key %s: %w", name, err)
		}
		r := annotation.Recipient{Key: wk.GetName(), KeyVersion: wk.GetVersion(), Suite: st.Name}
		r.Ciphertext, err = st.Seal(wk.GetPublicKey(), annotation.Info(broker, r), p.OptsData)
		if err != nil {
			return nil, fmt.Errorf("wrap for key %s: %w", name, err)
		}
		rs = append(rs, r)
	}
	return annotation.New(broker, rs...).Marshal()
}

func (h *Handler) unwrap(ctx context.Context, p ocikp.KeyUnwrapParams) ([]byte, error) {
	// dc is deliberately ignored: ocicrypt calls every provider whose
	// annotation is on the layer whatever keys the user named, and dc may
	// carry other providers' private keys. Authorization is the broker's.
	if len(p.Annotation) == 0 {
		return nil, errInput(errors.New("keyunwrap request carries no annotation"))
	}
	a, err := annotation.Parse(p.Annotation)
	if err != nil {
		return nil, errInput(err)
	}
	if h.Unwrapper == nil {
		return nil, errors.New("this host is not configured to unwrap (not an enrolled node)")
	}
	return h.Unwrapper.Unwrap(ctx, a, p.Annotation)
}

// codedError is an error with a gRPC code whose text stays plain, so exec
// mode prints the sentence rather than "rpc error: code = ...".
type codedError struct {
	code codes.Code
	err  error
}

func (e codedError) Error() string              { return e.err.Error() }
func (e codedError) Unwrap() error              { return e.err }
func (e codedError) GRPCStatus() *status.Status { return status.New(e.code, e.err.Error()) }

// WithCode attaches a gRPC status code to err for the gRPC transport.
func WithCode(code codes.Code, err error) error { return codedError{code, err} }

// Code maps a handler error to a gRPC status code.
func Code(err error) codes.Code {
	var in inputError
	if errors.As(err, &in) {
		return codes.InvalidArgument
	}
	if c := status.Code(err); c != codes.Unknown {
		return c
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return codes.DeadlineExceeded
	}
	return codes.Unknown
}
