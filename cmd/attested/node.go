package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

func nodeCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Enroll and attest this node; manage nodes (admin)"}
	var joinToken string
	enroll := &cobra.Command{
		Use:   "enroll",
		Short: "Enroll this node's TPM (EK and a new attestation key) with the broker",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM) error {
				info, err := b.Info(ctx, &apiv1.InfoRequest{})
				if err != nil {
					return err
				}
				st, n, err := attest.Enroll(ctx, b, t, attest.EnrollOptions{Name: c.Name, JoinToken: joinToken, BrokerID: info.GetBrokerId()})
				if err != nil {
					return err
				}
				if err := st.Save(c.StateDir); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s enrolled with broker %s (EK %s)\n", n.GetName(), info.GetBrokerId(), short(n.GetEkFingerprint()))
				if n.GetState() == apiv1.NodeState_NODE_STATE_PENDING {
					fmt.Fprintf(cmd.OutOrStdout(), "waiting for approval (EK certificate: %s): an admin runs 'attested node approve %s'\n", ekTrust(n.GetEkIssuer()), n.GetName())
				}
				return nil
			})
		},
	}
	enroll.Flags().StringVar(&joinToken, "join-token", "", "single-use join token from 'attested node token create' (else admin approval is needed)")
	var explain, earOut bool
	attestNow := &cobra.Command{
		Use:   "attest",
		Short: "Attest once: quote the PCRs and have the broker appraise them",
		Long: `Attest once: quote the PCRs, send them with the event logs, and have the broker
appraise them. With --explain, show what the broker established and every key's
policy evaluated clause by clause, pass or fail; nothing is released.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withEnrolledNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM, st *attest.State) error {
				s, err := attest.NewSession(ctx, b, t, st, c.logs())
				if err != nil {
					return err
				}
				w := cmd.OutOrStdout()
				if earOut { // stdout carries the EAR alone, for a pipe or a file
					if err := nodeEAR(ctx, w, cmd.ErrOrStderr(), b, st.Broker, s.EAR); err != nil {
						return err
					}
					w = cmd.ErrOrStderr()
				}
				fmt.Fprintf(w, "node %s attested: quote verified by broker %s; session valid until %s (TPM reset %d, restart %d)\n",
					st.Name, st.Broker, s.Expires.UTC().Format(time.RFC3339), s.ResetCount, s.RestartCount)
				if !explain {
					return nil
				}
				r, err := b.Explain(ctx, &apiv1.ExplainRequest{SessionToken: s.Token})
				if err != nil {
					return err
				}
				ex, err := s.OpenExplanation(t, r)
				if err != nil {
					return err
				}
				printExplanation(w, ex)
				return nil
			})
		},
	}
	attestNow.Flags().BoolVar(&explain, "explain", false, "show the full appraisal, clause by clause")
	attestNow.Flags().BoolVar(&earOut, "ear", false, "print the broker's signed attestation result (EAR JWT), checked with the broker's JWK Set, alone on standard output (the rest goes to standard error)")
	var ttl time.Duration
	token := &cobra.Command{Use: "token", Short: "Join tokens (admin)"}
	tokenCreate := &cobra.Command{
		Use: "create", Short: "Create a single-use join token", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{TtlSeconds: int64(ttl / time.Second)})
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), r.GetToken())
				return nil
			})
		},
	}
	tokenCreate.Flags().DurationVar(&ttl, "ttl", time.Hour, "token lifetime")
	token.AddCommand(tokenCreate)
	stateChange := func(use, short string, call func(context.Context, apiv1.AdminClient, string) (*apiv1.Node, error)) *cobra.Command {
		return &cobra.Command{
			Use: use + " NAME", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
					n, err := call(ctx, a, args[0])
					if err != nil {
						return err
					}
					fmt.Fprintf(cmd.OutOrStdout(), "node %s is now %s\n", n.GetName(), stateName(n.GetState()))
					return nil
				})
			},
		}
	}
	approve := stateChange("approve", "Approve an enrolled node (admin)", func(ctx context.Context, a apiv1.AdminClient, n string) (*apiv1.Node, error) {
		return a.ApproveNode(ctx, &apiv1.NodeRequest{Name: n})
	})
	removeNode := &cobra.Command{
		Use: "remove NAME", Short: "Remove a node, so its TPM (EK) can enroll again (admin)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				n, err := a.RemoveNode(ctx, &apiv1.NodeRequest{Name: args[0]})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s removed; its EK may enroll again\n", n.GetName())
				return nil
			})
		},
	}
	revoke := stateChange("revoke", "Revoke a node at once: its sessions end (admin)", func(ctx context.Context, a apiv1.AdminClient, n string) (*apiv1.Node, error) {
		return a.RevokeNode(ctx, &apiv1.NodeRequest{Name: n})
	})
	list := &cobra.Command{
		Use: "list", Short: "List nodes and their trust status (admin)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListNodes(ctx, &apiv1.ListNodesRequest{})
				if err != nil {
					return err
				}
				var rows [][]string
				for _, n := range r.GetNodes() {
					rows = append(rows, []string{n.GetName(), stateName(n.GetState()), dash(n.GetTrust()), unixTime(n.GetLastAttestedUnix()),
						sortedTags(n.GetTags()), short(n.GetEkFingerprint()), ekTrust(n.GetEkIssuer()), dash(n.GetTrustReason())})
				}
				table(cmd.OutOrStdout(), "NAME\tSTATE\tTRUST\tLAST ATTESTED\tTAGS\tEK\tEK CERTIFICATE\tREASON", rows)
				return nil
			})
		},
	}
	var remove []string
	tag := &cobra.Command{
		Use:   "tag NAME [KEY=VALUE]...",
		Short: "Set or remove asset tags on a node, e.g. region=EU tier=prod (admin)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			set := map[string]string{}
			for _, kv := range args[1:] {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("tag %q is not KEY=VALUE", kv)
				}
				set[k] = v
			}
			if len(set) == 0 && len(remove) == 0 {
				return fmt.Errorf("nothing to do: give KEY=VALUE tags or --remove KEY")
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				n, err := a.TagNode(ctx, &apiv1.TagNodeRequest{Name: args[0], Set: set, Remove: remove})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s tags: %s\n", n.GetName(), sortedTags(n.GetTags()))
				return nil
			})
		},
	}
	tag.Flags().StringSliceVar(&remove, "remove", nil, "tag names to remove")
	tags := &cobra.Command{Use: "tags", Short: "This node's TPM-certified asset tags"}
	tags.AddCommand(&cobra.Command{
		Use:   "sync",
		Short: "Write the digest of this node's tags (as the broker holds them) into its TPM's tag NV index",
		Long: `Write the digest of this node's tags, as the broker holds them, into an NV index of
its TPM that only the owner can write and that stays write-locked. Every later
attestation has the AK certify it (TPM2_NV_Certify), so a policy with
certifiedTags: true accepts tags only as this TPM attests them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withEnrolledNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM, st *attest.State) error {
				// The broker tells a node its tags only through a session,
				// sealed to the node's TPM.
				s, err := attest.NewSession(ctx, b, t, st, c.logs())
				if err != nil {
					return err
				}
				sealed, err := b.NodeTags(ctx, &apiv1.NodeTagsRequest{SessionToken: s.Token})
				if err != nil {
					return err
				}
				r, err := s.OpenTags(t, sealed)
				if err != nil {
					return err
				}
				if err := t.WriteTags(r.GetDigest()); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s: TPM now certifies tags %s\n", st.Name, sortedTags(r.GetTags()))
				return nil
			})
		},
	})
	cmd.AddCommand(enroll, attestNow, token, approve, revoke, removeNode, list, tag, tags)
	return cmd
}

func stateName(s apiv1.NodeState) string {
	switch s {
	case apiv1.NodeState_NODE_STATE_PENDING:
		return "pending"
	case apiv1.NodeState_NODE_STATE_ACTIVE:
		return "active"
	case apiv1.NodeState_NODE_STATE_REVOKED:
		return "revoked"
	}
	return "unknown"
}

// withNode runs fn with a broker client and this node's TPM, both bounded
// by the configured timeout.
func withNode(c *config, fn func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM) error) error {
	cc, err := dialBroker(c, false)
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout)
	defer cancel()
	t, err := attest.OpenTPM(ctx, c.TPM)
	if err != nil {
		return err
	}
	defer t.Close()
	return fn(ctx, apiv1.NewBrokerClient(cc), t)
}

func printExplanation(w io.Writer, ex *apiv1.Explanation) {
	fmt.Fprintf(w, "\nevidence of node %s:\n", ex.GetNode())
	for _, f := range ex.GetFacts() {
		fmt.Fprintf(w, "  %s\n", f)
	}
	if len(ex.GetKeys()) == 0 {
		fmt.Fprintln(w, "\nno keys on this broker")
	}
	for _, k := range ex.GetKeys() {
		verdict := "REFUSED"
		if k.GetAllowed() {
			verdict = "released"
		}
		fmt.Fprintf(w, "\nkey %s (policy %s): would be %s\n", k.GetKey(), k.GetPolicy(), verdict)
		for _, cl := range k.GetClauses() {
			mark := "FAIL"
			if cl.GetOk() {
				mark = "ok  "
			}
			fmt.Fprintf(w, "  %s %-18s %s\n", mark, cl.GetName(), cl.GetDetail())
		}
	}
}

// withEnrolledNode is withNode for a node that has enrolled.
func withEnrolledNode(c *config, fn func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM, st *attest.State) error) error {
	st, err := attest.LoadState(c.StateDir)
	if err != nil {
		return err
	}
	return withNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM) error { return fn(ctx, b, t, st) })
}

// short abbreviates a fingerprint for display.
func short(fp string) string {
	if len(fp) > 16 {
		return fp[:16] + ".."
	}
	return fp
}

// ekTrust says how an EK was admitted, so an admin approving a node sees
// whether its TPM proved its manufacturer.
func ekTrust(issuer string) string {
	if issuer == "" {
		return "unverified"
	}
	return "verified (" + issuer + ")"
}
