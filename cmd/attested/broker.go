package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/attested-dev/attested/broker"
	"github.com/attested-dev/attested/broker/dashboard"
)

func brokerCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "broker", Short: "Run the key broker"}
	var dataDir, caDir, id, listen string
	var sans, initEKRoots []string
	var initRequireEK bool
	initCmd := &cobra.Command{
		Use:     "init",
		Example: `  attested broker init --data-dir /var/lib/attested-broker --listen 0.0.0.0:8443 --san broker.example.internal --ek-roots /etc/attested/ek-roots/`,
		Short:   "Create a broker: master key, TLS CA and certificates, wrapping-key signer, admin credential",
		Long: `Create a broker in --data-dir: master key, TLS CA certificate, server certificate,
wrapping-key signing certificate, admin credential and broker.yaml. The CA private key
goes to --ca-dir, outside the data directory: serve never reads it, so move it offline.

init refuses when either directory already holds any broker file, and never
overwrites one: a second init cannot destroy a broker's keys. The CA may vouch only
for the server certificate's names (localhost, loopback, --id, the --listen host and
every --san) and the usages the broker needs; name every address clients use now.

New brokers admit only TPMs whose EK certificate chains to a manufacturer CA
(requireEKCertificate: true): give the CAs with --ek-roots, or add them under
ekRoots in broker.yaml before 'broker serve'.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("ca-dir") {
				caDir = broker.DefaultCADir(dataDir)
			}
			cfg, err := broker.Init(broker.InitOptions{DataDir: dataDir, CADir: caDir, ID: id, Listen: listen, SANs: sans,
				EKRoots: initEKRoots, AdmitUncertifiedTPMs: !initRequireEK})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "broker %s initialised in %s\n", cfg.ID, dataDir)
			fmt.Fprintf(out, "  listen:           %s\n", cfg.Listen)
			fmt.Fprintf(out, "  CA for clients:   %s\n", filepath.Join(dataDir, broker.CACertFile))
			fmt.Fprintf(out, "  admin credential: %s (keep it secret)\n", filepath.Join(dataDir, broker.AdminTokenFile))
			fmt.Fprintf(out, "  CA private key:   %s\n", filepath.Join(caDir, broker.CAKeyFile))
			fmt.Fprintf(out, "    serve never reads it: move %s offline now. It is needed only to issue\n", caDir)
			fmt.Fprintf(out, "    certificates again; whoever holds it can impersonate this broker.\n")
			switch {
			case !cfg.RequireEKCertificate:
				fmt.Fprintf(out, "  EK certificates:  NOT required: TPMs without one enroll with a join token or an approval;\n")
				fmt.Fprintf(out, "    a leaked token or careless approval admits a software TPM (serve warns at start)\n")
			case len(cfg.EKRoots) == 0:
				fmt.Fprintf(out, "  EK certificates:  required. Before 'broker serve', put your TPM manufacturers' CA\n")
				fmt.Fprintf(out, "    certificates (PEM) in a directory, e.g. /etc/attested/ek-roots/, and list it under\n")
				fmt.Fprintf(out, "    ekRoots in %s (serve refuses to start without one)\n", filepath.Join(dataDir, broker.ConfigFile))
			default:
				fmt.Fprintf(out, "  EK certificates:  required, chaining to %s\n", strings.Join(cfg.EKRoots, ", "))
			}
			return nil
		},
	}
	initCmd.Flags().StringVar(&id, "id", "", "broker identity recorded in annotations (default: random)")
	initCmd.Flags().StringSliceVar(&sans, "san", nil, "extra DNS names or IPs for the server certificate (the CA is constrained to these names)")
	initCmd.Flags().StringVar(&caDir, "ca-dir", "", "directory for the CA private key, outside the data directory (default: DATA-DIR-ca, e.g. /var/lib/attested-broker-ca)")
	initCmd.Flags().StringSliceVar(&initEKRoots, "ek-roots", nil, "PEM files or directories of TPM manufacturer CAs, written to broker.yaml (ekRoots)")
	initCmd.Flags().BoolVar(&initRequireEK, "require-ek-certificate", true, "admit only TPMs whose EK certificate chains to ekRoots; false admits uncertified TPMs through join tokens and approvals")

	var signerCADir string
	issueSignerCmd := &cobra.Command{
		Use:     "issue-signer",
		Example: `  attested broker issue-signer --data-dir /var/lib/attested-broker --ca-dir /var/lib/attested-broker`,
		Short:   "Give a broker initialised before signed wrapping keys its signing certificate",
		Long: `Issue the wrapping-key signing certificate (signer.pem, signer-key.pem) of a broker
initialised before wrapping keys were signed. Pipelines refuse unsigned wrapping keys,
so such a broker cannot have images encrypted for it until this has run. --ca-dir names
the directory holding the CA private key ca-key.pem: such a broker keeps it in its data
directory. Restart 'broker serve' afterwards, then move ca-key.pem offline.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if signerCADir == "" {
				return fmt.Errorf("--ca-dir is required: the directory holding %s (a broker initialised before signed wrapping keys keeps it in its data directory)", broker.CAKeyFile)
			}
			cert, err := broker.IssueSigner(dataDir, signerCADir)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "wrapping-key signing certificate for broker %s written to %s (valid until %s)\n",
				cert.Subject.CommonName, filepath.Join(dataDir, broker.SignerCertFile), cert.NotAfter.Format(time.DateOnly))
			fmt.Fprintf(out, "restart 'attested broker serve' to sign wrapping keys with it\n")
			if inData := filepath.Join(dataDir, broker.CAKeyFile); fileExists(inData) {
				fmt.Fprintf(out, "then move the CA private key %s offline: serve never reads it\n", inData)
			}
			return nil
		},
	}
	issueSignerCmd.Flags().StringVar(&signerCADir, "ca-dir", "", "directory holding the CA private key "+broker.CAKeyFile)

	var ekRoots []string
	var requireEK, serveDashboard bool
	var sessionTTL, nonceTTL, staleAfter, pendingTTL time.Duration
	var maxPending, maxPendingPerName, maxInFlight int
	var metricsListen, storeURL string
	var approveCertified bool
	var applyLimits func(*broker.Config)
	serveCmd := &cobra.Command{
		Use: "serve",
		Example: `  attested broker serve --data-dir /var/lib/attested-broker
  attested broker serve --data-dir /var/lib/attested-broker --metrics-listen 0.0.0.0:9464 --stale-after 10m
  PGPASSFILE=/etc/attested/pgpass attested broker serve --data-dir /var/lib/attested-broker \
    --store 'postgres://attested@db.internal/attested?sslmode=verify-full&sslrootcert=/etc/attested/db-ca.pem'`,
		Short: "Serve the broker API over TLS",
		Long: `Serve the broker API over TLS. Settings come from DATA-DIR/broker.yaml; a flag
given on the command line wins over the file.

Like ssh, serve refuses a data directory that another user owns or that group or
others may enter, and broker files that others may read (master.key, admin.token,
private keys, broker.db) or change (the rest), naming the chmod or chown that fixes it.

Several replicas behind one address share a PostgreSQL database (--store, or store:
in broker.yaml): init one broker, then give every replica a copy of its data
directory, so that all hold the same master key, certificates and admin credential.`,
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
				if fl.Changed("dashboard") {
					c.DisableDashboard = !serveDashboard
				}
				if fl.Changed("metrics-listen") {
					c.MetricsListen = metricsListen
				}
				if fl.Changed("stale-after") {
					c.StaleAfter = staleAfter
				}
				if fl.Changed("pending-ttl") {
					c.PendingTTL = pendingTTL
				}
				if fl.Changed("max-pending") {
					c.MaxPending = maxPending
				}
				if fl.Changed("max-pending-per-name") {
					c.MaxPendingPerName = maxPendingPerName
				}
				if fl.Changed("max-enrollments-in-flight") {
					c.MaxEnrollmentsInFlight = maxInFlight
				}
				if fl.Changed("approve-certified-eks") {
					c.ApproveCertifiedEKs = approveCertified
				}
				if fl.Changed("store") {
					c.Store = storeURL
				}
				applyLimits(c)
			})
		},
	}
	serveCmd.Flags().StringSliceVar(&ekRoots, "ek-roots", nil, "PEM files or directories of TPM manufacturer CAs EK certificates must chain to (broker.yaml: ekRoots; none trusted by default)")
	serveCmd.Flags().BoolVar(&requireEK, "require-ek-certificate", false, "refuse TPMs without an EK certificate chaining to --ek-roots (broker.yaml: requireEKCertificate, which init sets to true); when false, serve warns of the risk at start")
	serveCmd.Flags().DurationVar(&sessionTTL, "session-ttl", broker.DefaultSessionTTL, "how long one appraisal serves unwraps (broker.yaml: sessionTTL)")
	serveCmd.Flags().DurationVar(&nonceTTL, "nonce-ttl", broker.DefaultNonceTTL, "how long a node has to answer a challenge (broker.yaml: nonceTTL)")
	serveCmd.Flags().StringVar(&metricsListen, "metrics-listen", broker.DefaultMetricsListen, "serve Prometheus metrics over HTTP on this address; 'off' to serve none (broker.yaml: metricsListen)")
	serveCmd.Flags().DurationVar(&staleAfter, "stale-after", broker.DefaultStaleAfter, "a node without evidence for this long is stale (broker.yaml: staleAfter)")
	serveCmd.Flags().DurationVar(&pendingTTL, "pending-ttl", broker.DefaultPendingTTL, "how long an enrollment waits for approval (broker.yaml: pendingTTL)")
	serveCmd.Flags().IntVar(&maxPending, "max-pending", broker.DefaultMaxPending, "enrollments waiting for approval, at most (broker.yaml: maxPending)")
	serveCmd.Flags().IntVar(&maxPendingPerName, "max-pending-per-name", broker.DefaultMaxPendingPerName, "enrollments waiting for approval under one name, at most (broker.yaml: maxPendingPerName)")
	serveCmd.Flags().IntVar(&maxInFlight, "max-enrollments-in-flight", broker.DefaultMaxEnrollmentsInFlight, "credential activation challenges open at once, at most (broker.yaml: maxEnrollmentsInFlight)")
	serveCmd.Flags().BoolVar(&approveCertified, "approve-certified-eks", false, "admit TPMs whose EK certificate chains to ekRoots without approval; only when ekRoots is your own provisioning CA (broker.yaml: approveCertifiedEKs)")
	serveCmd.Flags().StringVar(&storeURL, "store", "", "PostgreSQL URL shared by broker replicas, e.g. postgres://attested@db/attested?sslmode=verify-full&sslrootcert=/etc/attested/db-ca.pem; "+
		"no password in it (PGPASSFILE, ?passfile= or PGPASSWORD); empty: the embedded store in DATA-DIR (broker.yaml: store)")
	serveCmd.Flags().BoolVar(&serveDashboard, "dashboard", true, "serve the admin dashboard to browsers on the TLS port (broker.yaml: disableDashboard)")
	applyLimits = limitFlags(serveCmd.Flags())
	for _, c := range []*cobra.Command{initCmd, serveCmd, issueSignerCmd} {
		c.Flags().StringVar(&dataDir, "data-dir", "/var/lib/attested-broker", "broker data directory")
	}
	for _, c := range []*cobra.Command{initCmd, serveCmd} {
		c.Flags().StringVar(&listen, "listen", "", "TLS gRPC listen address (default from broker.yaml, "+broker.DefaultListen+")")
	}
	cmd.AddCommand(initCmd, serveCmd, issueSignerCmd, issueEARKeyCmd())
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
	if addr := srv.Config().MetricsListen; addr != "off" {
		if _, err := serveMetrics(ctx, addr, srv.Metrics(), log); err != nil {
			return fmt.Errorf("broker: %w", err)
		}
	}
	// The dashboard shares the TLS port: browsers reach it, gRPC clients
	// the API (broker.Frontend tells them apart by ALPN).
	var dash http.Handler
	if !srv.Config().DisableDashboard {
		d, err := dashboard.New(dashboard.Options{Broker: srv, BrokerID: srv.Config().ID, Log: log, Metrics: srv.Metrics()})
		if err != nil {
			lis.Close()
			return err
		}
		dash = d
	}
	front := srv.Frontend(cert, dash)
	go srv.Run(ctx)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		front.Shutdown(sctx)
	}()
	log.Info("broker serving", "id", srv.Config().ID, "listen", lis.Addr().String())
	if dash != nil {
		log.Info("dashboard: open it in a browser and log in with the admin credential (admin.token)", "url", dashboardURL(lis.Addr().String()))
	}
	if err := front.Serve(lis); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("broker: serve: %w", err)
	}
	return nil
}

// dashboardURL is the dashboard's address for a listen address; a wildcard
// listener is named by localhost (use a name of the broker certificate
// from elsewhere).
func dashboardURL(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "https://" + listen + "/"
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "localhost"
	}
	return "https://" + net.JoinHostPort(host, port) + "/"
}

func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
