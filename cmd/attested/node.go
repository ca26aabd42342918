package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

func nodeCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Enroll and attest this node; manage nodes (admin)"}
	var joinTokenFile, argvToken string
	enroll := &cobra.Command{
		Use: "enroll",
		Example: `  attested node enroll --join-token-file join.token
  attested node token create --output - | ssh worker-1 attested node enroll --join-token-file -
  attested node enroll    # no token: prints the EK fingerprint for the admin to approve`,
		Short: "Enroll this node's TPM (EK and a new attestation key) with the broker",
		Long: `Enroll this node's TPM: its EK (and EK certificate, when the TPM has one) and a
new attestation key, proven to live in the same TPM by credential activation.

With a join token ('attested node token create') the node is active at once.
Give the token in a file (--join-token-file PATH, '-' for stdin; the file must
not be readable by other users) or in the environment (` + joinTokenEnv + `),
never on the command line, where every local user can read it.

Without a token the enrollment waits for an admin: it prints this TPM's EK
fingerprint, which the admin compares with what 'attested node list --pending'
shows before running 'attested node approve NAME --ek SHA256:...'.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cmd.Flags().Changed("join-token") {
				return errArgvToken
			}
			tok, err := joinToken(joinTokenFile, cmd.InOrStdin())
			if err != nil {
				return err
			}
			return withNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM) error {
				info, err := b.Info(ctx, &apiv1.InfoRequest{})
				if err != nil {
					return err
				}
				st, n, err := attest.Enroll(ctx, b, t, attest.EnrollOptions{Name: c.Name, JoinToken: tok, BrokerID: info.GetBrokerId()})
				if err != nil {
					return err
				}
				if err := st.Save(c.StateDir); err != nil {
					return err
				}
				w := cmd.OutOrStdout()
				fp := fingerprint(n.GetEkFingerprint())
				if n.GetState() == apiv1.NodeState_NODE_STATE_PENDING {
					fmt.Fprintf(w, "node %s enrolled with broker %s: waiting for approval until %s\n", n.GetName(), info.GetBrokerId(), unixTime(n.GetPendingExpiresUnix()))
				} else {
					fmt.Fprintf(w, "node %s enrolled with broker %s: %s\n", n.GetName(), info.GetBrokerId(), stateName(n.GetState()))
				}
				fmt.Fprintf(w, "  EK:             %s\n", fp)
				fmt.Fprintf(w, "  EK certificate: %s\n", ekTrust(n.GetEkIssuer()))
				if n.GetState() == apiv1.NodeState_NODE_STATE_PENDING {
					fmt.Fprintf(w, "An admin checks that this EK fingerprint is this machine's and approves it:\n  attested node approve %s --ek %s\n", n.GetName(), fp)
				}
				return nil
			})
		},
	}
	enroll.Flags().StringVar(&joinTokenFile, "join-token-file", "", "file holding a single-use join token from 'attested node token create' ('-' for stdin; env "+joinTokenEnv+"); without one, an admin approves the EK")
	enroll.Flags().StringVar(&argvToken, "join-token", "", "refused: use --join-token-file or "+joinTokenEnv)
	enroll.Flags().MarkHidden("join-token")
	var explain, earOut bool
	attestNow := &cobra.Command{
		Use: "attest",
		Example: `  attested node attest
  attested node attest --explain   # exits 1 when a key would be refused
  attested node attest --ear > node.ear`,
		Short: "Attest once: quote the PCRs and have the broker appraise them",
		Long: `Attest once: quote the PCRs, send them with the event logs, and have the broker
appraise them. With --explain, show what the broker established and every key's
policy evaluated clause by clause, pass or fail; nothing is released.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withEnrolledNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM, st *attest.State) error {
				s, err := attest.NewSession(ctx, b, t, st, c.Logs())
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
				var refused []string
				for _, k := range ex.GetKeys() {
					if !k.GetAllowed() {
						refused = append(refused, k.GetKey())
					}
				}
				if len(refused) > 0 {
					// Scripts and operators read the exit status: a node
					// that would be refused a key is not fine.
					return fmt.Errorf("node %s would be refused key %s (clauses above)", st.Name, strings.Join(refused, ", "))
				}
				return nil
			})
		},
	}
	attestNow.Flags().BoolVar(&explain, "explain", false, "show the full appraisal, clause by clause")
	attestNow.Flags().BoolVar(&earOut, "ear", false, "print the broker's signed attestation result (EAR JWT), checked with the broker's JWK Set, alone on standard output (the rest goes to standard error)")
	var ttl time.Duration
	var tokenOut string
	token := &cobra.Command{Use: "token", Short: "Join tokens (admin)"}
	tokenCreate := &cobra.Command{
		Use: "create", Short: "Create a single-use join token", Args: cobra.NoArgs,
		Example: `  attested node token create --ttl 1h --output join.token`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ttl < time.Second {
				return fmt.Errorf("--ttl %s: a join token lives at least 1s (and at most %s)", ttl, broker.MaxJoinTokenTTL)
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{TtlSeconds: int64(ttl / time.Second)})
				if err != nil {
					return err
				}
				if tokenOut == "" {
					fmt.Fprintln(cmd.OutOrStdout(), r.GetToken())
					return nil
				}
				if err := writeSecretFile(tokenOut, r.GetToken()+"\n"); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "join token written to %s (mode 0600), valid until %s; on the node: attested node enroll --join-token-file FILE\n",
					tokenOut, unixTime(r.GetExpiresUnix()))
				return nil
			})
		},
	}
	tokenCreate.Flags().DurationVar(&ttl, "ttl", time.Hour, "token lifetime")
	tokenCreate.Flags().StringVarP(&tokenOut, "output", "o", "", "write the token to this new file (mode 0600) instead of stdout")
	token.AddCommand(tokenCreate)
	stateChange := func(use, short string, call func(context.Context, apiv1.AdminClient, string) (*apiv1.Node, error)) *cobra.Command {
		return &cobra.Command{
			Use: use + " NAME", Short: short, Args: cobra.ExactArgs(1),
			Example: "  attested node " + use + " worker-1",
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
	var approveEK string
	approve := &cobra.Command{
		Use: "approve NAME --ek SHA256:...",
		Example: `  attested node list --pending
  attested node approve worker-1 --ek SHA256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08`,
		Short: "Approve a pending enrollment, naming its TPM by EK fingerprint (admin)",
		Long: `Approve the enrollment waiting under NAME whose EK fingerprint is the one given:
the fingerprint 'attested node enroll' printed on the machine. Anyone can make
an enrollment wait under any name, so compare the fingerprint with the one the
machine showed you before approving; 'attested node list --pending' shows what
waits. Other enrollments waiting under NAME are dropped.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				n, err := a.ApproveNode(ctx, &apiv1.NodeRequest{Name: args[0], EkFingerprint: approveEK})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s is now %s (EK %s, EK certificate %s)\n", n.GetName(), stateName(n.GetState()),
					fingerprint(n.GetEkFingerprint()), ekTrust(n.GetEkIssuer()))
				return nil
			})
		},
	}
	approve.Flags().StringVar(&approveEK, "ek", "", "EK fingerprint (SHA256:...) the node printed at enrollment (required)")
	var removeEK string
	removeNode := &cobra.Command{
		Use: "remove NAME [--ek SHA256:...]",
		Example: `  attested node remove worker-1
  attested node remove worker-1 --ek SHA256:9f86...   # reject one enrollment waiting for approval`,
		Short: "Remove a node, so its TPM (EK) can enroll again, or reject a pending enrollment (admin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				n, err := a.RemoveNode(ctx, &apiv1.NodeRequest{Name: args[0], EkFingerprint: removeEK})
				if err != nil {
					return err
				}
				if n.GetState() == apiv1.NodeState_NODE_STATE_PENDING {
					fmt.Fprintf(cmd.OutOrStdout(), "pending enrollment of node %s with EK %s rejected\n", n.GetName(), fingerprint(n.GetEkFingerprint()))
					return nil
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s removed; its EK may enroll again\n", n.GetName())
				return nil
			})
		},
	}
	removeNode.Flags().StringVar(&removeEK, "ek", "", "EK fingerprint: reject the enrollment of NAME waiting with this EK (or remove node NAME only if it has this EK)")
	revoke := stateChange("revoke", "Revoke a node at once: its sessions end (admin)", func(ctx context.Context, a apiv1.AdminClient, n string) (*apiv1.Node, error) {
		return a.RevokeNode(ctx, &apiv1.NodeRequest{Name: n})
	})
	var onlyPending bool
	list := &cobra.Command{
		Use: "list", Short: "List nodes and their trust status, and enrollments waiting for approval (admin)", Args: cobra.NoArgs,
		Example: `  attested node list
  attested node list --pending`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListNodes(ctx, &apiv1.ListNodesRequest{})
				if err != nil {
					return err
				}
				w := cmd.OutOrStdout()
				if !onlyPending {
					var rows [][]string
					for _, n := range r.GetNodes() {
						rows = append(rows, []string{n.GetName(), dash(n.GetStatus()), unixTime(n.GetStatusSinceUnix()), unixTime(n.GetLastAttestedUnix()),
							sortedTags(n.GetTags()), short(n.GetEkFingerprint()), ekTrust(n.GetEkIssuer()), dash(n.GetStatusReason())})
					}
					table(w, "NAME\tSTATUS\tSINCE\tLAST ATTESTED\tTAGS\tEK\tEK CERTIFICATE\tREASON", rows)
					if len(r.GetPending()) == 0 {
						return nil
					}
					fmt.Fprintln(w)
				}
				if len(r.GetPending()) == 0 {
					fmt.Fprintln(w, "no enrollment is waiting for approval")
					return nil
				}
				fmt.Fprintln(w, "Waiting for approval ('attested node approve NAME --ek EK' once the EK is the machine's):")
				var rows [][]string
				for _, n := range r.GetPending() {
					rows = append(rows, []string{n.GetName(), fingerprint(n.GetEkFingerprint()), ekTrust(n.GetEkIssuer()),
						unixTime(n.GetEnrolledUnix()), unixTime(n.GetPendingExpiresUnix())})
				}
				table(w, "NAME\tEK\tEK CERTIFICATE\tENROLLED\tEXPIRES", rows)
				return nil
			})
		},
	}
	list.Flags().BoolVar(&onlyPending, "pending", false, "list only enrollments waiting for approval")
	show := &cobra.Command{
		Use: "show NAME", Short: "Show a node: status, last evidence, sessions, status history (admin)", Args: cobra.ExactArgs(1),
		Example: `  attested node show worker-1`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				d, err := a.GetNode(ctx, &apiv1.NodeRequest{Name: args[0]})
				if err != nil {
					return err
				}
				printNode(cmd.OutOrStdout(), d)
				return nil
			})
		},
	}
	var remove []string
	tag := &cobra.Command{
		Use: "tag NAME [KEY=VALUE]...",
		Example: `  attested node tag worker-1 region=EU tier=prod
  attested node tag worker-1 --remove tier`,
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
		Use:     "sync",
		Example: `  attested node tags sync   # on the node, after an admin tagged it`,
		Short:   "Write the digest of this node's tags (as the broker holds them) into its TPM's tag NV index",
		Long: `Write the digest of this node's tags, as the broker holds them, into an NV index of
its TPM that only the owner can write and that stays write-locked. Every later
attestation has the AK certify it (TPM2_NV_Certify), so a policy with
certifiedTags: true accepts tags only as this TPM attests them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withEnrolledNode(c, func(ctx context.Context, b apiv1.BrokerClient, t *attest.TPM, st *attest.State) error {
				// The broker tells a node its tags only through a session,
				// sealed to the node's TPM.
				s, err := attest.NewSession(ctx, b, t, st, c.Logs())
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
	cmd.AddCommand(enroll, attestNow, token, approve, revoke, removeNode, list, show, tag, tags)
	return cmd
}

// printNode prints what node show shows.
func printNode(w io.Writer, d *apiv1.NodeDetail) {
	n := d.GetNode()
	fmt.Fprintf(w, "node %s\n", n.GetName())
	fmt.Fprintf(w, "  status:        %s since %s\n", dash(n.GetStatus()), unixTime(n.GetStatusSinceUnix()))
	fmt.Fprintf(w, "  reason:        %s\n", dash(n.GetStatusReason()))
	fmt.Fprintf(w, "  enrolled:      %s (state %s)\n", unixTime(n.GetEnrolledUnix()), stateName(n.GetState()))
	fmt.Fprintf(w, "  EK:            %s (EK certificate %s)\n", fingerprint(n.GetEkFingerprint()), ekTrust(n.GetEkIssuer()))
	fmt.Fprintf(w, "  tags:          %s (version %d)\n", sortedTags(n.GetTags()), n.GetTagsVersion())
	fmt.Fprintf(w, "  TPM-certified: %s\n", sortedTags(n.GetCertifiedTags()))
	fmt.Fprintf(w, "\nlast accepted evidence: %s\n", unixTime(d.GetLastEvidenceUnix()))
	for _, l := range d.GetEvidence() {
		fmt.Fprintf(w, "  %s\n", l)
	}
	fmt.Fprintf(w, "\nlive sessions: %d\n", len(d.GetSessions()))
	for _, s := range d.GetSessions() {
		fmt.Fprintf(w, "  opened %s, expires %s\n", unixTime(s.GetCreatedUnix()), unixTime(s.GetExpiresUnix()))
	}
	fmt.Fprintln(w, "\nstatus history:")
	var rows [][]string
	for _, h := range d.GetHistory() {
		rows = append(rows, []string{"  " + unixTime(h.GetTimeUnix()), h.GetStatus(), h.GetReason()})
	}
	table(w, "  TIME\tSTATUS\tREASON", rows)
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
	if c.NameSet && c.Name != st.Name {
		return fmt.Errorf("this node is enrolled as %q (state in %s), not %q: drop --name, or enroll under the new name", st.Name, c.StateDir, c.Name)
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
	return "verified (issuer " + issuer + ")"
}

// fingerprint is an EK fingerprint in full, as approvals name it.
func fingerprint(hex string) string { return broker.DisplayFingerprint(hex) }

// joinTokenEnv carries a join token for 'node enroll'.
const joinTokenEnv = "ATTESTED_JOIN_TOKEN"

var errArgvToken = errors.New("--join-token is no longer accepted: a secret on the command line is readable by every local user (/proc/PID/cmdline); give the token with --join-token-file PATH ('-' for stdin) or in " + joinTokenEnv)

// maxJoinToken bounds what is read as a join token (tokens are ~52 bytes).
const maxJoinToken = 4 << 10

// joinToken reads the join token from file ('-' is stdin) or the
// environment; "" when neither is given (enrollment then waits for
// approval).
func joinToken(file string, stdin io.Reader) (string, error) {
	env, inEnv := os.LookupEnv(joinTokenEnv)
	var raw []byte
	switch {
	case file != "" && inEnv:
		return "", fmt.Errorf("join token given twice: --join-token-file and %s; give one", joinTokenEnv)
	case file == "-":
		b, err := io.ReadAll(io.LimitReader(stdin, maxJoinToken+1))
		if err != nil {
			return "", fmt.Errorf("join token from stdin: %w", err)
		}
		raw = b
	case file != "":
		b, err := readPrivateFile(file, maxJoinToken+1)
		if err != nil {
			return "", fmt.Errorf("join token: %w", err)
		}
		raw = b
	case inEnv:
		raw = []byte(env)
	default:
		return "", nil
	}
	if len(raw) > maxJoinToken {
		return "", fmt.Errorf("join token: more than %d bytes; is that the token file?", maxJoinToken)
	}
	tok := strings.TrimSpace(string(raw))
	if tok == "" || strings.ContainsAny(tok, " \t\r\n") {
		return "", errors.New("join token: want the one line 'attested node token create' printed")
	}
	return tok, nil
}

// readPrivateFile reads up to limit bytes of a file that no other user
// may read: a secret in a group- or world-readable file is not one.
func readPrivateFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Mode().IsRegular() && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s is accessible to other users (mode %04o); chmod 600 it (or pass the token on stdin)", path, fi.Mode().Perm())
	}
	return io.ReadAll(io.LimitReader(f, limit))
}

// writeSecretFile creates path (it must not exist) with mode 0600.
func writeSecretFile(path, data string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}
