package main

import (
	"context"
	"fmt"
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
				fmt.Fprintf(cmd.OutOrStdout(), "node %s enrolled with broker %s (EK %s..)\n", n.GetName(), info.GetBrokerId(), n.GetEkFingerprint()[:16])
				if n.GetState() == apiv1.NodeState_NODE_STATE_PENDING {
					fmt.Fprintf(cmd.OutOrStdout(), "waiting for approval: an admin runs 'attested node approve %s'\n", n.GetName())
				}
				return nil
			})
		},
	}
	enroll.Flags().StringVar(&joinToken, "join-token", "", "single-use join token from 'attested node token create' (else admin approval is needed)")
	attestNow := &cobra.Command{
		Use:   "attest",
		Short: "Attest once: quote the PCRs and have the broker appraise them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := attest.LoadState(c.StateDir)
			if err != nil {
				return err
			}
			return withNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM) error {
				s, err := attest.NewSession(ctx, b, t, st)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s attested: quote verified by broker %s; session valid until %s (TPM reset %d, restart %d)\n",
					st.Name, st.Broker, s.Expires.UTC().Format(time.RFC3339), s.ResetCount, s.RestartCount)
				return nil
			})
		},
	}
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
						sortedTags(n.GetTags()), n.GetEkFingerprint()[:16] + "..", dash(n.GetTrustReason())})
				}
				table(cmd.OutOrStdout(), "NAME\tSTATE\tTRUST\tLAST ATTESTED\tTAGS\tEK\tREASON", rows)
				return nil
			})
		},
	}
	cmd.AddCommand(enroll, attestNow, token, approve, revoke, list)
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
