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
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/attested-dev/attested/broker"
)

func brokerCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "broker", Short: "Run the key broker"}
	var dataDir, id, listen string
	var sans []string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a broker: master key, TLS CA and certificate, admin credential",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := broker.Init(broker.InitOptions{DataDir: dataDir, ID: id, Listen: listen, SANs: sans})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "broker %s initialised in %s\n", cfg.ID, dataDir)
			fmt.Fprintf(cmd.OutOrStdout(), "  listen:           %s\n", cfg.Listen)
			fmt.Fprintf(cmd.OutOrStdout(), "  CA for clients:   %s\n", filepath.Join(dataDir, broker.CACertFile))
			fmt.Fprintf(cmd.OutOrStdout(), "  admin credential: %s (keep it secret)\n", filepath.Join(dataDir, broker.AdminTokenFile))
			return nil
		},
	}
	initCmd.Flags().StringVar(&id, "id", "", "broker identity recorded in annotations (default: random)")
	initCmd.Flags().StringSliceVar(&sans, "san", nil, "extra DNS names or IPs for the server certificate")
	var ekRoots []string
	var requireEK bool
	var sessionTTL, nonceTTL time.Duration
	var applyLimits func(*broker.Config)
	serveCmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the broker API over TLS",
		Long: `Serve the broker API over TLS. Settings come from DATA-DIR/broker.yaml; a flag
given on the command line wins over the file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := cmd.Flags()
			return serveBroker(dataDir, func(c *broker.Config) {
				if fl.Changed("listen") {
					c.Listen = listen
				}
				if fl.Changed("ek-roots") {
					c.EKRoots = ekRoots
				}
				if fl.Changed("require-ek-certificate") {
					c.RequireEKCertificate = requireEK
				}
				if fl.Changed("session-ttl") {
					c.SessionTTL = sessionTTL
				}
				if fl.Changed("nonce-ttl") {
					c.NonceTTL = nonceTTL
				}
				applyLimits(c)
			})
		},
	}
	serveCmd.Flags().StringSliceVar(&ekRoots, "ek-roots", nil, "PEM files or directories of TPM manufacturer CAs EK certificates must chain to (broker.yaml: ekRoots; none trusted by default)")
	serveCmd.Flags().BoolVar(&requireEK, "require-ek-certificate", false, "refuse TPMs without an EK certificate chaining to --ek-roots (broker.yaml: requireEKCertificate)")
	serveCmd.Flags().DurationVar(&sessionTTL, "session-ttl", broker.DefaultSessionTTL, "how long one appraisal serves unwraps (broker.yaml: sessionTTL)")
	serveCmd.Flags().DurationVar(&nonceTTL, "nonce-ttl", broker.DefaultNonceTTL, "how long a node has to answer a challenge (broker.yaml: nonceTTL)")
	applyLimits = limitFlags(serveCmd.Flags())
	for _, c := range []*cobra.Command{initCmd, serveCmd} {
		c.Flags().StringVar(&dataDir, "data-dir", "/var/lib/attested-broker", "broker data directory")
		c.Flags().StringVar(&listen, "listen", "", "TLS gRPC listen address (default from broker.yaml, "+broker.DefaultListen+")")
	}
	cmd.AddCommand(initCmd, serveCmd)
	return cmd
}

func serveBroker(dataDir string, flags func(*broker.Config)) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	srv, err := broker.Open(dataDir, log, flags)
	if err != nil {
		return err
	}
	defer srv.Close()
	cert, err := broker.LoadServerCertificate(dataDir)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", srv.Config().Listen)
	if err != nil {
		return fmt.Errorf("broker: listen: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	g := srv.GRPCServer(cert)
	lis = srv.LimitListener(lis)
	go srv.Run(ctx)
	go func() {
		<-ctx.Done()
		done := make(chan struct{})
		go func() { g.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			g.Stop()
		}
	}()
	log.Info("broker serving", "id", srv.Config().ID, "listen", lis.Addr().String())
	if err := g.Serve(lis); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("broker: serve: %w", err)
	}
	return nil
}
