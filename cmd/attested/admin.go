package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
)

func dialBroker(c *config, admin bool) (*grpc.ClientConn, error) {
	o := conn.Options{Addr: c.Broker, CAFile: c.BrokerCA, Timeout: c.Timeout}
	if admin {
		if c.AdminTokenFile == "" {
			return nil, fmt.Errorf("admin commands need the admin credential: --admin-token-file (or adminTokenFile in the config)")
		}
		o.AdminTokenFile = c.AdminTokenFile
	}
	return conn.Dial(o)
}

// withAdmin runs fn with an Admin client and a bounded context.
func withAdmin(c *config, fn func(ctx context.Context, a apiv1.AdminClient) error) error {
	cc, err := dialBroker(c, true)
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout)
	defer cancel()
	return fn(ctx, apiv1.NewAdminClient(cc))
}

func table(w io.Writer, header string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func unixTime(s int64) string {
	if s == 0 {
		return "-"
	}
	return time.Unix(s, 0).UTC().Format(time.RFC3339)
}

func keyCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Manage wrapping keys (admin)"}
	var policy string
	create := &cobra.Command{
		Use:   "create NAME --policy POLICY",
		Short: "Create a key whose layer keys are released only under POLICY",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				k, err := a.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: args[0], Policy: policy})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "key %s version %d created (%s), released under policy %s\n", k.GetName(), k.GetVersion(), k.GetSuite(), k.GetPolicy())
				fmt.Fprintf(cmd.OutOrStdout(), "encrypt with: --encryption-key provider:attested:key=%s\n", k.GetName())
				return nil
			})
		},
	}
	create.Flags().StringVar(&policy, "policy", "", "policy that guards the key (required)")
	list := &cobra.Command{
		Use: "list", Short: "List keys", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListKeys(ctx, &apiv1.ListKeysRequest{})
				if err != nil {
					return err
				}
				var rows [][]string
				for _, k := range r.GetKeys() {
					rows = append(rows, []string{k.GetName(), fmt.Sprint(k.GetVersion()), k.GetPolicy(), k.GetSuite(), unixTime(k.GetCreatedUnix())})
				}
				table(cmd.OutOrStdout(), "NAME\tVERSION\tPOLICY\tSUITE\tCREATED", rows)
				return nil
			})
		},
	}
	cmd.AddCommand(create, list)
	return cmd
}

func policyCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Manage appraisal policies (admin)"}
	var file string
	apply := &cobra.Command{
		Use: "apply -f FILE", Short: "Create or update a policy from YAML", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				p, err := a.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: string(data)})
				if err != nil {
					return fmt.Errorf("%s: %w", file, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "policy %s applied (revision %d)\n", p.GetName(), p.GetRevision())
				return nil
			})
		},
	}
	apply.Flags().StringVarP(&file, "file", "f", "", "policy YAML file ('-' for stdin)")
	apply.MarkFlagRequired("file")
	list := &cobra.Command{
		Use: "list", Short: "List policies", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListPolicies(ctx, &apiv1.ListPoliciesRequest{})
				if err != nil {
					return err
				}
				var rows [][]string
				for _, p := range r.GetPolicies() {
					rows = append(rows, []string{p.GetName(), fmt.Sprint(p.GetRevision()), unixTime(p.GetUpdatedUnix())})
				}
				table(cmd.OutOrStdout(), "NAME\tREVISION\tUPDATED", rows)
				return nil
			})
		},
	}
	var fromNode, name string
	learn := &cobra.Command{
		Use: "learn --from-node NODE", Short: "Draft a policy from a node's last accepted evidence (prints YAML)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.LearnPolicy(ctx, &apiv1.LearnPolicyRequest{Node: fromNode, Name: name})
				if err != nil {
					return err
				}
				fmt.Fprint(cmd.OutOrStdout(), r.GetYaml())
				return nil
			})
		},
	}
	learn.Flags().StringVar(&fromNode, "from-node", "", "node whose evidence to learn from (required)")
	learn.Flags().StringVar(&name, "name", "", "policy name (default learned-NODE)")
	learn.MarkFlagRequired("from-node")
	cmd.AddCommand(apply, list, learn)
	return cmd
}

func auditCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Read the audit trail (admin)"}
	var node, kind string
	var limit uint32
	var asJSON bool
	list := &cobra.Command{
		Use: "list", Short: "List audit events, oldest first", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListAudit(ctx, &apiv1.ListAuditRequest{Node: node, Kind: kind, Limit: limit})
				if err != nil {
					return err
				}
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					for _, e := range r.GetEvents() {
						if err := enc.Encode(e); err != nil {
							return err
						}
					}
					return nil
				}
				var rows [][]string
				for _, e := range r.GetEvents() {
					verdict := "deny"
					if e.GetAllowed() {
						verdict = "ok"
					}
					rows = append(rows, []string{fmt.Sprint(e.GetSeq()), time.Unix(0, e.GetTimeUnixNano()).UTC().Format(time.RFC3339),
						e.GetKind(), verdict, dash(e.GetNode()), dash(e.GetKey()), e.GetReason()})
				}
				table(cmd.OutOrStdout(), "SEQ\tTIME\tKIND\tRESULT\tNODE\tKEY\tREASON", rows)
				return nil
			})
		},
	}
	list.Flags().StringVar(&node, "node", "", "only this node")
	list.Flags().StringVar(&kind, "kind", "", "only this kind (enroll, approve, revoke, remove, attest, release, refuse, key, policy, token, tag)")
	list.Flags().Uint32Var(&limit, "limit", 0, "at most this many (newest)")
	list.Flags().BoolVar(&asJSON, "json", false, "one JSON object per line")
	cmd.AddCommand(list)
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func sortedTags(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	sort.Strings(parts)
	return dash(strings.Join(parts, ","))
}
