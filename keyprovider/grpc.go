package keyprovider

import (
	"context"
	"time"

	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"google.golang.org/grpc/status"
)

// Service is ocicrypt's KeyProviderService over the shared Handler.
type Service struct {
	keyproviderpb.UnimplementedKeyProviderServiceServer
	Handler *Handler
	// Timeout bounds each call: ocicrypt sends context.Background().
	Timeout time.Duration
}

// WrapKey implements keyproviderpb.KeyProviderServiceServer.
func (s *Service) WrapKey(ctx context.Context, in *keyproviderpb.KeyProviderKeyWrapProtocolInput) (*keyproviderpb.KeyProviderKeyWrapProtocolOutput, error) {
	return s.serve(ctx, in)
}

// UnWrapKey implements keyproviderpb.KeyProviderServiceServer.
func (s *Service) UnWrapKey(ctx context.Context, in *keyproviderpb.KeyProviderKeyWrapProtocolInput) (*keyproviderpb.KeyProviderKeyWrapProtocolOutput, error) {
	return s.serve(ctx, in)
}

func (s *Service) serve(ctx context.Context, in *keyproviderpb.KeyProviderKeyWrapProtocolInput) (*keyproviderpb.KeyProviderKeyWrapProtocolOutput, error) {
	if s.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Timeout)
		defer cancel()
	}
	out, err := s.Handler.Handle(ctx, in.GetKeyProviderKeyWrapProtocolInput())
	if err != nil {
		return nil, status.Error(Code(err), "attested: "+err.Error())
	}
	return &keyproviderpb.KeyProviderKeyWrapProtocolOutput{KeyProviderKeyWrapProtocolOutput: out}, nil
}
