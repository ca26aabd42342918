package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/ear"
)

// earCmd is the relying party's side of attestation results: fetch the
// broker's JWK Set, verify an EAR with it.
func earCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ear",
		Short: "Verify attestation results (EAR) the broker signed; print its JWK Set",
		Long: `Each accepted attestation yields an EAT Attestation Result (EAR,
draft-ietf-rats-ear-04): a JWT the broker signs (ES256) with the AR4SI trust
vector of the node and the broker's claims about it. A node prints its own with
'attested node attest --ear'; anyone holding the broker's JWK Set verifies it.

Fetch the JWK Set over the TLS channel pinned to the broker CA (--broker,
--broker-ca), as these commands do: that channel is what makes its keys the
broker's.`,
		Example: `  attested node attest --ear > node.ear          # on the node
  attested ear verify node.ear --require-affirming  # anywhere with --broker and --broker-ca`,
	}
	jwks := &cobra.Command{
		Use:     "jwks",
		Short:   "Print the broker's JWK Set, the keys that verify its attestation results",
		Example: `  attested ear jwks --broker broker.example:8443 --broker-ca ca.pem > broker-jwks.json`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withBroker(c, func(ctx context.Context, b apiv1.BrokerClient) error {
				set, raw, err := fetchJWKS(ctx, b)
				if err != nil {
					return err
				}
				if len(set.Keys) == 0 {
					return fmt.Errorf("broker %s publishes no EAR key: it was initialised before attestation results; an admin runs 'attested broker issue-ear-key' on it and restarts it", c.Broker)
				}
				fmt.Fprintln(cmd.OutOrStdout(), raw)
				return nil
			})
		},
	}
	var jwksFile string
	var asJSON, requireAffirming bool
	verify := &cobra.Command{
		Use:   "verify [FILE|-]",
		Short: "Verify an attestation result and print what it says",
		Long: `Verify an EAR (a compact JWT; from FILE, or standard input with - or no
argument): its ES256 signature by a key of the broker's JWK Set (fetched from
--broker over TLS pinned to --broker-ca, or read from --jwks), its claims
(draft-ietf-rats-ear-04; the Veraison spellings are read too), and its validity
(iat, exp). Then print the node's status, trust vector and policy verdicts, or
with --json the claims-set.

Exit status 1 when the EAR does not verify, and with --require-affirming when
its ear_status is not affirming.`,
		Example: `  attested node attest --ear > node.ear
  attested ear verify node.ear --broker broker.example:8443 --broker-ca ca.pem
  attested ear verify --jwks broker-jwks.json --require-affirming < node.ear`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			token, err := readToken(cmd.InOrStdin(), args)
			if err != nil {
				return err
			}
			var r *ear.Result
			if jwksFile != "" {
				data, err := os.ReadFile(jwksFile)
				if err != nil {
					return fmt.Errorf("ear: %w", err)
				}
				set, err := ear.ParseJWKS(data)
				if err != nil {
					return fmt.Errorf("%s: %w", jwksFile, err)
				}
				if r, err = ear.Verify(token, set, time.Now()); err != nil {
					return err
				}
			} else if err := withBroker(c, func(ctx context.Context, b apiv1.BrokerClient) error {
				set, _, err := fetchJWKS(ctx, b)
				if err != nil {
					return err
				}
				r, err = ear.Verify(token, set, time.Now())
				return err
			}); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				out, err := json.MarshalIndent(r, "", "  ")
				if err != nil {
					return err
				}
				fmt.Fprintln(w, string(out))
			} else {
				printResult(w, r)
			}
			if requireAffirming && (r.Status == nil || *r.Status != ear.TierAffirming) {
				st := "absent"
				if r.Status != nil {
					st = r.Status.String()
				}
				return fmt.Errorf("ear: verified, but its ear_status is %s, not affirming", st)
			}
			return nil
		},
	}
	verify.Flags().StringVar(&jwksFile, "jwks", "", "JWK Set file to verify with (default: fetch it from --broker)")
	verify.Flags().BoolVar(&asJSON, "json", false, "print the verified claims-set as JSON")
	verify.Flags().BoolVar(&requireAffirming, "require-affirming", false, "fail unless ear_status is affirming")
	cmd.AddCommand(jwks, verify)
	return cmd
}

// issueEARKeyCmd is 'attested broker issue-ear-key'.
func issueEARKeyCmd() *cobra.Command {
	var dataDir string
	cmd := &cobra.Command{
		Use:   "issue-ear-key",
		Short: "Give a broker initialised before attestation results its EAR signing key",
		Long: `Create the attestation-result (EAR) signing key, ` + broker.EARKeyFile + ` (ECDSA P-256, 0600), of
a broker initialised before EARs; 'broker init' creates it for new brokers. Serve
does not create it: replicas of one broker must share one key (copy the file to
each), and a data directory may be read-only. Refuses when the key exists.
Restart 'broker serve' afterwards; relying parties then fetch its JWK Set
('attested ear jwks').`,
		Example: `  attested broker issue-ear-key --data-dir /var/lib/attested-broker
  systemctl restart attested-broker`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			kid, err := broker.IssueEARKey(dataDir)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "EAR signing key written to %s (kid %s)\n", filepath.Join(dataDir, broker.EARKeyFile), kid)
			fmt.Fprintf(out, "restart 'attested broker serve' to sign attestation results with it; copy it to every replica of this broker\n")
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/attested-broker", "broker data directory")
	return cmd
}

// withBroker runs fn with a broker client (no credential) and a bounded
// context.
func withBroker(c *config, fn func(ctx context.Context, b apiv1.BrokerClient) error) error {
	cc, err := dialBroker(c, false)
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout)
	defer cancel()
	return fn(ctx, apiv1.NewBrokerClient(cc))
}

func fetchJWKS(ctx context.Context, b apiv1.BrokerClient) (*jose.JSONWebKeySet, string, error) {
	r, err := b.JWKS(ctx, &apiv1.JWKSRequest{})
	if err != nil {
		return nil, "", fmt.Errorf("ear: fetching the broker's JWK Set: %s", status.Convert(err).Message())
	}
	set, err := ear.ParseJWKS([]byte(r.GetJwks()))
	if err != nil {
		return nil, "", err
	}
	return set, r.GetJwks(), nil
}

func readToken(stdin io.Reader, args []string) (string, error) {
	var data []byte
	var err error
	if len(args) == 0 || args[0] == "-" {
		data, err = io.ReadAll(io.LimitReader(stdin, ear.MaxTokenSize+1))
	} else {
		data, err = os.ReadFile(args[0])
	}
	if err != nil {
		return "", fmt.Errorf("ear: %w", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("ear: no attestation result given (a file, or the JWT on standard input)")
	}
	return token, nil
}

// nodeEAR verifies the EAR a node just received with the JWK Set of the
// broker that issued it (same pinned connection), prints it on w and a
// summary on diag.
func nodeEAR(ctx context.Context, w, diag io.Writer, b apiv1.BrokerClient, broker, token string) error {
	if token == "" {
		return fmt.Errorf("broker %s issued no attestation result (EAR): it has no EAR signing key; an admin runs 'attested broker issue-ear-key' on it and restarts it", broker)
	}
	set, _, err := fetchJWKS(ctx, b)
	if err != nil {
		return err
	}
	r, err := ear.Verify(token, set, time.Now())
	if err != nil {
		return fmt.Errorf("the attestation result from broker %s does not verify with its JWK Set: %w", broker, err)
	}
	printResult(diag, r)
	fmt.Fprintln(w, token)
	return nil
}

// printResult says what a verified EAR states, for people.
func printResult(w io.Writer, r *ear.Result) {
	st := "-"
	if r.Status != nil {
		st = r.Status.String()
	}
	fmt.Fprintf(w, "attestation result verified: issued at %s", time.Unix(r.IssuedAt, 0).UTC().Format(time.RFC3339))
	if r.Expires != 0 {
		fmt.Fprintf(w, ", valid until %s", time.Unix(r.Expires, 0).UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(w, "; status %s\n", st)
	for _, label := range slices.Sorted(maps.Keys(r.Submods)) {
		a := r.Submods[label]
		fmt.Fprintf(w, "  %s: %s\n", label, a.Status)
		if a.TrustVector != nil {
			claims := a.TrustVector.Claims()
			for _, name := range []string{"instance-identity", "hardware", "configuration", "executables", "file-system", "sourced-data", "runtime-opaque", "storage-opaque"} {
				fmt.Fprintf(w, "    %-18s %s (%d)\n", name, claims[name].Tier(), claims[name])
			}
		}
		nc, err := a.NodeClaims()
		if err != nil {
			continue // not one of ours: the vector is all we read
		}
		fmt.Fprintf(w, "    node %s at broker %s, EK %s, tags %s", nc.Node, nc.Broker, nc.EKFingerprint, sortedTags(nc.Tags))
		if len(nc.CertifiedTags) > 0 {
			fmt.Fprintf(w, " (certified by its TPM)")
		}
		fmt.Fprintln(w)
		for _, name := range slices.Sorted(maps.Keys(nc.Policies)) {
			p := nc.Policies[name]
			switch {
			case p.Error != "":
				fmt.Fprintf(w, "    policy %s (revision %d): not evaluated: %s\n", name, p.Revision, p.Error)
			case p.Allowed:
				fmt.Fprintf(w, "    policy %s (revision %d): accepts\n", name, p.Revision)
			default:
				fmt.Fprintf(w, "    policy %s (revision %d): refuses (%s)\n", name, p.Revision, strings.Join(p.Failed, ", "))
			}
		}
	}
}
