package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/localfile"
	"github.com/attested-dev/attested/cmd/internal/execmode"
	"github.com/attested-dev/attested/keyprovider"
	"github.com/attested-dev/attested/keyprovider/agentmetrics"
)

func agentCmd(c *config) *cobra.Command {
	var listen string
	cmd := &cobra.Command{
		Use:     "agent",
		Example: `  attested agent --config /etc/attested/node.yaml --listen unix:///run/attested/keyprovider.sock`,
		Short:   "Node daemon: ocicrypt gRPC keyprovider on a unix socket, with a warm attestation session",
		Long: `Node daemon. Serves ocicrypt's KeyProviderService on a unix socket (0600), keeps an
attestation session warm in memory and re-attests every --reattest so the broker
always knows this node's state. Point OCICRYPT_KEYPROVIDER_CONFIG at
  {"key-providers":{"attested":{"grpc":"unix:///run/attested/keyprovider.sock"}}}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAgent(c, listen)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "unix:///run/attested/keyprovider.sock", "unix socket to serve on")
	return cmd
}

// tpmLinger is how long the agent keeps the TPM open after a use: the
// layers of one pull arrive within it and share the connection and the
// loaded session key (about half a millisecond per layer on swtpm). Other
// processes wait at most this long for an swtpm; a kernel resource manager
// (/dev/tpmrm0) serves them at once.
const tpmLinger = 250 * time.Millisecond

func runAgent(c *config, listen string) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	path, ok := strings.CutPrefix(listen, "unix://")
	if !ok || !filepath.IsAbs(path) {
		return fmt.Errorf("agent: --listen must be unix:///ABSOLUTE/PATH, got %q", listen)
	}
	// In-memory sessions: the agent is the one process holding them.
	h, closeFn, err := execmode.NewHandler(c, nil)
	if err != nil {
		return err
	}
	defer closeFn()
	if nu, ok := h.Unwrapper.(*keyprovider.NodeUnwrapper); ok {
		nu.Sessions.Linger = tpmLinger
		defer nu.Sessions.Close()
	}
	// Whoever can write the socket's directory can swap the socket.
	if err := localfile.EnsureDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("agent: socket directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("agent: remove stale socket: %w", err)
	}
	// Whoever can connect can ask for layer keys this node may have:
	// owner only.
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("agent: listen: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := []grpc.ServerOption{grpc.MaxRecvMsgSize(keyprovider.MaxRequest)}
	if c.MetricsListen != "" {
		reg := prometheus.NewRegistry()
		m := agentmetrics.NewMetrics(reg)
		opts = append(opts, grpc.UnaryInterceptor(m.Interceptor()))
		attest.QuoteHook = m.Quoted
		if nu, ok := h.Unwrapper.(*keyprovider.NodeUnwrapper); ok {
			nu.Sessions.Observe = m.Attested
		}
		if _, err := serveMetrics(ctx, c.MetricsListen, reg, log); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
	}
	g := grpc.NewServer(opts...)
	keyproviderpb.RegisterKeyProviderServiceServer(g, &keyprovider.Service{Handler: h, Timeout: c.Timeout})
	if nu, ok := h.Unwrapper.(*keyprovider.NodeUnwrapper); ok {
		go reattest(ctx, log, nu, c.Reattest, c.Timeout)
	} else {
		log.Warn("agent serves wrap only: this node cannot unwrap", "reason", errString(h.Unwrapper))
	}
	go func() { <-ctx.Done(); g.GracefulStop() }()
	log.Info("agent serving", "socket", path)
	return g.Serve(lis)
}

// reattest keeps the broker's view of this node current and the session
// warm, so a pull rarely waits for a quote.
func reattest(ctx context.Context, log *slog.Logger, nu *keyprovider.NodeUnwrapper, every, timeout time.Duration) {
	for {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		s, err := nu.Sessions.Refresh(cctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			log.Warn("attestation failed", "err", err)
		} else if err == nil {
			log.Info("attested", "node", s.Node, "expires", s.Expires.UTC().Format(time.RFC3339))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

func errString(u keyprovider.Unwrapper) string {
	if f, ok := u.(execmode.Failing); ok {
		return f.Err.Error()
	}
	return ""
}
