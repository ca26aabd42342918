package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker"
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
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Manage wrapping keys (admin)",
		Long: `A key wraps layer keys at build time and is released at pull time only to nodes
whose evidence satisfies its policy. A key has versions: 'key rotate' adds one that
new wraps use while layers wrapped under older versions still unwrap, and 'key
disable' stops the releases of a version (or of all of them) at once.`,
		Example: `  attested key create payments --policy prod
  attested key rotate payments
  attested key disable payments@1
  attested key show payments`,
	}
	var policy string
	create := &cobra.Command{
		Use:   "create NAME --policy POLICY",
		Short: "Create a key whose layer keys are released only under POLICY",
		Example: `  attested policy apply -f prod.yaml
  attested key create payments --policy prod
  skopeo copy --encryption-key provider:attested:key=payments oci:app docker://registry/app:1`,
		Args: cobra.ExactArgs(1),
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
		Use: "list", Short: "List keys and their versions", Args: cobra.NoArgs,
		Example: `  attested key list`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListKeys(ctx, &apiv1.ListKeysRequest{})
				if err != nil {
					return err
				}
				var rows [][]string
				for _, k := range r.GetKeys() {
					rows = append(rows, []string{k.GetName(), fmt.Sprint(k.GetVersion()), k.GetPolicy(), k.GetSuite(), unixTime(k.GetCreatedUnix()), unixTime(k.GetDisabledUnix())})
				}
				table(cmd.OutOrStdout(), "NAME\tVERSION\tPOLICY\tSUITE\tCREATED\tDISABLED", rows)
				return nil
			})
		},
	}
	rotate := &cobra.Command{
		Use:   "rotate NAME",
		Short: "Add a key version that new wraps use; older versions still unwrap",
		Long: `Add a version of the key, with the same policy, in the broker's default suite.
The broker hands it out for every new wrap; layers wrapped under older versions keep
unwrapping until those versions are disabled ('attested key disable NAME@VERSION').
Pipelines move to the new version when their cached copy of the public key expires
(10 minutes by default).`,
		Example: `  attested key rotate payments
  attested key disable payments@1    # later, once no image needs version 1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				k, err := a.RotateKey(ctx, &apiv1.KeyRequest{Name: args[0]})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "key %s rotated: version %d (%s) wraps new layers; layers wrapped under earlier versions still unwrap unless those are disabled\n",
					k.GetName(), k.GetVersion(), k.GetSuite())
				return nil
			})
		},
	}
	disable := &cobra.Command{
		Use:   "disable NAME[@VERSION]",
		Short: "Stop releasing a key version (or every version) at once",
		Long: `Disable a version of a key, or every version when none is named. From the next
request on, no layer key wrapped under a disabled version is released, to any node,
and new wraps use the latest version still enabled. Disabling cannot be undone:
'attested key rotate NAME' adds a version that releases.`,
		Example: `  attested key disable payments@1    # version 1 only
  attested key disable payments      # every version`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, version, err := parseKeyVersion(args[0])
			if err != nil {
				return err
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				k, err := a.DisableKey(ctx, &apiv1.KeyRequest{Name: name, Version: version})
				if err != nil {
					return err
				}
				since := unixTime(k.GetDisabledUnix())
				if version == 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "every version of key %s is disabled: nothing wrapped under it is released from now on ('attested key rotate %s' adds a version that releases)\n", name, name)
				} else {
					fmt.Fprintf(cmd.OutOrStdout(), "key %s version %d disabled since %s: nothing wrapped under it is released\n", name, version, since)
				}
				return nil
			})
		},
	}
	show := &cobra.Command{
		Use:     "show NAME",
		Short:   "Show a key's versions, suite, policy and release counts",
		Example: `  attested key show payments`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				d, err := a.GetKey(ctx, &apiv1.KeyRequest{Name: args[0]})
				if err != nil {
					return err
				}
				printKey(cmd.OutOrStdout(), args[0], d)
				return nil
			})
		},
	}
	cmd.AddCommand(create, list, rotate, disable, show)
	return cmd
}

// parseKeyVersion splits NAME[@VERSION].
func parseKeyVersion(arg string) (string, uint32, error) {
	name, v, ok := strings.Cut(arg, "@")
	if !ok {
		return name, 0, nil
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("key version %q after '@' must be a number from 1 (leave it out for every version)", v)
	}
	return name, uint32(n), nil
}

func printKey(w io.Writer, name string, d *apiv1.KeyDetail) {
	p := d.GetPolicy()
	if p != nil {
		fmt.Fprintf(w, "key %s: policy %s (revision %d, applied %s)\n", name, p.GetName(), p.GetRevision(), unixTime(p.GetUpdatedUnix()))
	} else if vs := d.GetVersions(); len(vs) > 0 {
		fmt.Fprintf(w, "key %s: policy %s (does not exist: nothing is released)\n", name, vs[len(vs)-1].GetPolicy())
	}
	counts := map[uint32]*apiv1.KeyVersionCounts{}
	for _, c := range d.GetCounts() {
		counts[c.GetVersion()] = c
	}
	wrapping := uint32(0)
	for _, k := range d.GetVersions() {
		if k.GetDisabledUnix() == 0 {
			wrapping = k.GetVersion()
		}
	}
	var rows [][]string
	for _, k := range d.GetVersions() {
		state := "unwraps"
		switch {
		case k.GetDisabledUnix() != 0:
			state = "disabled " + unixTime(k.GetDisabledUnix())
		case k.GetVersion() == wrapping:
			state = "wraps and unwraps"
		}
		c := counts[k.GetVersion()]
		rows = append(rows, []string{fmt.Sprint(k.GetVersion()), k.GetSuite(), unixTime(k.GetCreatedUnix()), state,
			fmt.Sprint(c.GetReleases()), fmt.Sprint(c.GetRefusals())})
	}
	table(w, "VERSION\tSUITE\tCREATED\tSTATE\tRELEASES\tREFUSALS", rows)
	if wrapping == 0 {
		fmt.Fprintf(w, "every version is disabled: nothing is wrapped or released ('attested key rotate %s' adds a version)\n", name)
	}
}

func policyCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Manage appraisal policies (admin)",
		Long: `A policy says what a node's evidence must show for a key's layer keys to be released
to it. Every applied revision is kept ('policy history'); applying the current
revision's YAML again changes nothing.`,
		Example: `  attested policy apply -f prod.yaml
  attested policy apply -f policies/
  attested policy history prod`,
	}
	var files []string
	apply := &cobra.Command{
		Use:   "apply -f FILE|DIR [-f ...]",
		Short: "Create or update policies from YAML files or directories",
		Long: `Apply each policy file named with -f, and each *.yaml and *.yml file in a directory
named with -f (not its subdirectories), in name order, reporting per file. A file the
same as its policy's current revision is reported unchanged and makes no revision.
'-f -' reads one policy from standard input. Exits non-zero if any file failed.`,
		Example: `  attested policy apply -f prod.yaml
  attested policy apply -f prod.yaml -f staging.yaml
  attested policy apply -f /etc/attested/policies/
  attested policy learn --from-node worker-1 | attested policy apply -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			paths, err := policyFiles(files)
			if err != nil {
				return err
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				return applyPolicies(ctx, a, cmd.OutOrStdout(), paths)
			})
		},
	}
	apply.Flags().StringArrayVarP(&files, "file", "f", nil, "policy YAML file, or directory of them ('-' for stdin); repeatable")
	apply.MarkFlagRequired("file")
	list := &cobra.Command{
		Use: "list", Short: "List policies", Args: cobra.NoArgs,
		Example: `  attested policy list`,
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
	var revision uint32
	history := &cobra.Command{
		Use:   "history NAME [--revision N]",
		Short: "List every revision of a policy, or print one",
		Long: `List every applied revision of a policy, oldest first, with when it was applied and
a digest of its YAML; --revision prints that revision's YAML as applied. A release's
audit record names the policy revision that allowed it.`,
		Example: `  attested policy history prod
  attested policy history prod --revision 2 > prod-r2.yaml
  diff <(attested policy history prod --revision 2) <(attested policy history prod --revision 3)`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListPolicyRevisions(ctx, &apiv1.PolicyRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if revision != 0 {
					for _, p := range r.GetPolicies() {
						if p.GetRevision() == revision {
							fmt.Fprint(cmd.OutOrStdout(), p.GetYaml())
							return nil
						}
					}
					return fmt.Errorf("policy %s has no revision %d kept ('attested policy history %s' lists them)", args[0], revision, args[0])
				}
				var rows [][]string
				for _, p := range r.GetPolicies() {
					sum := sha256.Sum256([]byte(p.GetYaml()))
					rows = append(rows, []string{fmt.Sprint(p.GetRevision()), unixTime(p.GetUpdatedUnix()), "sha256:" + hex.EncodeToString(sum[:6])})
				}
				table(cmd.OutOrStdout(), "REVISION\tAPPLIED\tYAML", rows)
				return nil
			})
		},
	}
	history.Flags().Uint32Var(&revision, "revision", 0, "print this revision's YAML")
	var fromNode, name string
	learn := &cobra.Command{
		Use: "learn --from-node NODE", Short: "Draft a policy from a node's last accepted evidence (prints YAML)", Args: cobra.NoArgs,
		Long: `Draft a policy from what a node's last accepted evidence showed: its PCR values and
the facts its event logs proved. Review the draft before applying it: it trusts
whatever that node booted. A warning goes to standard error when every drafted PCR
value is zero: the node has no measured boot, and such a policy tells nothing
about what booted.`,
		Example: `  attested policy learn --from-node worker-1 > prod.yaml
  attested policy learn --from-node worker-1 --name prod | attested policy apply -f -`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.LearnPolicy(ctx, &apiv1.LearnPolicyRequest{Node: fromNode, Name: name})
				if err != nil {
					return err
				}
				fmt.Fprint(cmd.OutOrStdout(), r.GetYaml())
				if pcrs := zeroPCRs(r.GetYaml()); pcrs != "" {
					fmt.Fprintf(cmd.ErrOrStderr(), "attested: warning: every PCR value drafted (PCRs %s) is all zeros: node %s shows no measured boot (its firmware extended nothing into the TPM), so this policy says nothing about what it booted; enable measured boot (UEFI with TPM 2.0) or pin PCRs a measured component extends\n", pcrs, fromNode)
				}
				return nil
			})
		},
	}
	learn.Flags().StringVar(&fromNode, "from-node", "", "node whose evidence to learn from (required)")
	learn.Flags().StringVar(&name, "name", "", "policy name (default learned-NODE)")
	learn.MarkFlagRequired("from-node")
	cmd.AddCommand(apply, list, history, learn)
	return cmd
}

// zeroPCRs lists the PCRs of a drafted policy when every value drafted is
// all zeros ("" otherwise).
func zeroPCRs(draft string) string {
	var p struct {
		PCRs map[int][]string `yaml:"pcrs"`
	}
	if yaml.Unmarshal([]byte(draft), &p) != nil || len(p.PCRs) == 0 {
		return ""
	}
	var idx []int
	for i, vs := range p.PCRs {
		for _, v := range vs {
			if strings.Trim(v, "0") != "" {
				return ""
			}
		}
		idx = append(idx, i)
	}
	sort.Ints(idx)
	var out []string
	for _, i := range idx {
		out = append(out, strconv.Itoa(i))
	}
	return strings.Join(out, ", ")
}

// policyFiles expands -f arguments: files as given, directories to their
// *.yaml and *.yml files in name order.
func policyFiles(args []string) ([]string, error) {
	var out []string
	stdin := 0
	for _, a := range args {
		if a == "-" {
			if stdin++; stdin > 1 {
				return nil, fmt.Errorf("'-f -' (standard input) can be given once")
			}
			out = append(out, a)
			continue
		}
		fi, err := os.Stat(a)
		if err != nil {
			return nil, fmt.Errorf("policy file: %w", err)
		}
		if !fi.IsDir() {
			out = append(out, a)
			continue
		}
		entries, err := os.ReadDir(a)
		if err != nil {
			return nil, fmt.Errorf("policy directory: %w", err)
		}
		n := 0
		for _, e := range entries {
			if ext := filepath.Ext(e.Name()); !e.IsDir() && (ext == ".yaml" || ext == ".yml") {
				out = append(out, filepath.Join(a, e.Name()))
				n++
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("policy directory %q holds no *.yaml or *.yml file", a)
		}
	}
	return out, nil
}

// applyPolicies applies each file and reports on each; it fails if any
// did, after trying them all.
func applyPolicies(ctx context.Context, a apiv1.AdminClient, w io.Writer, paths []string) error {
	// The revisions before, so an unchanged policy is told apart.
	current := map[string]uint32{}
	ps, err := a.ListPolicies(ctx, &apiv1.ListPoliciesRequest{})
	if err != nil {
		return err
	}
	for _, p := range ps.GetPolicies() {
		current[p.GetName()] = p.GetRevision()
	}
	prefix := func(path string) string {
		if len(paths) == 1 {
			return ""
		}
		return path + ": "
	}
	failed := 0
	for _, path := range paths {
		var data []byte
		var err error
		if path == "-" {
			data, err = io.ReadAll(io.LimitReader(os.Stdin, 4<<20))
		} else {
			data, err = os.ReadFile(path)
		}
		if err == nil {
			var p *apiv1.Policy
			if p, err = a.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: string(data)}); err == nil {
				if rev, ok := current[p.GetName()]; ok && rev == p.GetRevision() {
					fmt.Fprintf(w, "%spolicy %s unchanged (revision %d)\n", prefix(path), p.GetName(), p.GetRevision())
				} else {
					fmt.Fprintf(w, "%spolicy %s applied (revision %d)\n", prefix(path), p.GetName(), p.GetRevision())
				}
				current[p.GetName()] = p.GetRevision()
				continue
			}
		}
		failed++
		if len(paths) == 1 {
			return fmt.Errorf("%s: %w", path, err)
		}
		fmt.Fprintf(w, "%sFAILED: %s\n", prefix(path), plainError(err))
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d policy files failed (see above)", failed, len(paths))
	}
	return nil
}

func auditCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Read and verify the audit trail (admin)",
		Long: `The broker records every enrollment, attestation, release, refusal and admin action in
its audit trail. Each record is hash-chained to the one before it and MACed with a key
derived from the broker's master key; 'audit verify' checks the whole trail.`,
		Example: `  attested audit list --node worker-1 --kind release --since 24h
  attested audit list --json --since 2025-06-01T00:00:00Z >> siem.jsonl
  attested audit verify`,
	}
	var node, kind, key, since, until string
	var limit uint32
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List audit records, oldest first",
		Long: `List audit records, oldest first, filtered by node, kind, key and time. --since and
--until take an RFC 3339 time (2025-06-01T12:00:00Z), a date (2025-06-01, UTC), or a
duration meaning that long ago (24h, 30m). --json writes one JSON object per line for
a SIEM, with every field: seq, time, kind, node, key, key_version, layer_digest,
policy, policy_revision, allowed, reason, actor, hash.

Kinds: ` + strings.Join(broker.AuditKinds, ", ") + `.`,
		Example: `  attested audit list --kind release --key payments --since 24h
  attested audit list --node worker-1 --since 2025-06-01 --until 2025-06-02
  attested audit list --json --since 1h >> /var/log/attested-audit.jsonl`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &apiv1.ListAuditRequest{Node: node, Kind: kind, Key: key, Limit: limit}
			now := time.Now()
			for _, b := range []struct {
				flag, val string
				dst       *int64
			}{{"--since", since, &req.SinceUnixNano}, {"--until", until, &req.UntilUnixNano}} {
				if b.val == "" {
					continue
				}
				t, err := parseWhen(b.val, now)
				if err != nil {
					return fmt.Errorf("%s: %w", b.flag, err)
				}
				*b.dst = t.UnixNano()
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListAudit(ctx, req, grpc.MaxCallRecvMsgSize(maxAuditResponse))
				if err != nil {
					return err
				}
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					for _, e := range r.GetEvents() {
						if err := enc.Encode(auditJSON(e)); err != nil {
							return err
						}
					}
					return nil
				}
				var rows [][]string
				for _, e := range r.GetEvents() {
					rows = append(rows, auditRow(e))
				}
				table(cmd.OutOrStdout(), "SEQ\tTIME\tKIND\tRESULT\tNODE\tKEY\tPOLICY\tLAYER\tREASON", rows)
				return nil
			})
		},
	}
	list.Flags().StringVar(&node, "node", "", "only this node")
	list.Flags().StringVar(&kind, "kind", "", "only this kind ("+strings.Join(broker.AuditKinds, ", ")+")")
	list.Flags().StringVar(&key, "key", "", "only this key")
	list.Flags().StringVar(&since, "since", "", "only records at or after this time (RFC 3339, a date, or a duration ago: 24h)")
	list.Flags().StringVar(&until, "until", "", "only records at or before this time (same forms as --since)")
	list.Flags().Uint32Var(&limit, "limit", 0, "at most this many (the newest)")
	list.Flags().BoolVar(&asJSON, "json", false, "one JSON object per line (for a SIEM)")
	var anchor string
	verify := &cobra.Command{
		Use:   "verify [--anchor SEQ:HASH]",
		Short: "Check the audit trail's hash chain, MACs and checkpoint",
		Long: `Check every audit record against its hash chain and MAC and the trail against the
broker's MACed checkpoint (the count of records and the newest one's hash), and print
the head: its sequence number and hash. Exits non-zero, naming the first record that
does not verify and why, if anything was edited, deleted, inserted or reordered, or the
newest records were deleted.

What this cannot tell alone: someone holding the broker's master key can rewrite the
trail and its MACs, and someone who puts back an older copy of the whole database
(records and checkpoint) goes unseen. Record the printed head (SEQ:HASH) somewhere the
broker cannot write (a ticket, a SIEM, a log host); --anchor then checks that record
is still in the trail with that hash, so nothing up to it was changed or removed.`,
		Example: `  attested audit verify
  attested audit verify --anchor 1234:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var aSeq uint64
			var aHash []byte
			if anchor != "" {
				var err error
				if aSeq, aHash, err = parseAnchor(anchor); err != nil {
					return err
				}
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.VerifyAudit(ctx, &apiv1.VerifyAuditRequest{})
				if err != nil {
					return err
				}
				if !r.GetOk() {
					return fmt.Errorf("audit trail of %d records: %s (first bad record: seq %d)", r.GetRecords(), r.GetDetail(), r.GetFirstBadSeq())
				}
				fmt.Fprintf(cmd.OutOrStdout(), "ok: %d records; %s\n", r.GetRecords(), r.GetDetail())
				head, err := a.ListAudit(ctx, &apiv1.ListAuditRequest{Limit: 1})
				if err != nil {
					return err
				}
				if evs := head.GetEvents(); len(evs) == 1 && len(evs[0].GetHash()) > 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "anchor: %d:%x (record it outside the broker; check it later with --anchor)\n", evs[0].GetSeq(), evs[0].GetHash())
				}
				if anchor == "" {
					return nil
				}
				return checkAnchor(ctx, a, cmd.OutOrStdout(), aSeq, aHash, head.GetEvents())
			})
		},
	}
	verify.Flags().StringVar(&anchor, "anchor", "", "a head printed by an earlier verify (SEQ:HASH): check it is still in the trail")
	cmd.AddCommand(list, verify)
	return cmd
}

// maxAuditResponse bounds an audit listing the CLI accepts.
const maxAuditResponse = 256 << 20

// parseWhen reads a --since/--until value.
func parseWhen(v string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, v); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("%q is not a time: give RFC 3339 (2025-06-01T12:00:00Z), a date (2025-06-01) or a duration ago (24h)", v)
}

func parseAnchor(v string) (uint64, []byte, error) {
	s, h, ok := strings.Cut(v, ":")
	seq, err := strconv.ParseUint(s, 10, 64)
	hash, herr := hex.DecodeString(h)
	if !ok || err != nil || seq == 0 || herr != nil || len(hash) != sha256.Size {
		return 0, nil, fmt.Errorf("--anchor %q: want SEQ:HASH as 'audit verify' prints it (a record number, a colon, 64 hex digits)", v)
	}
	return seq, hash, nil
}

// checkAnchor checks record seq of a verified trail still has hash. The
// trail verified, so every record from it to the head follows it: the
// anchor fixes everything up to it.
func checkAnchor(ctx context.Context, a apiv1.AdminClient, w io.Writer, seq uint64, hash []byte, head []*apiv1.AuditEvent) error {
	if len(head) == 0 || head[0].GetSeq() < seq {
		return fmt.Errorf("anchor NOT found: the trail ends before seq %d; the records after it were deleted (an older copy of the database was put back?)", seq)
	}
	// The newest records back to seq (sequence numbers may have gaps, so
	// this many reach at least as far back).
	n := head[0].GetSeq() - seq + 1
	if n > math.MaxUint32 {
		return fmt.Errorf("anchor seq %d is too far back to fetch in one listing", seq)
	}
	r, err := a.ListAudit(ctx, &apiv1.ListAuditRequest{Limit: uint32(n)}, grpc.MaxCallRecvMsgSize(maxAuditResponse))
	if err != nil {
		return err
	}
	for _, e := range r.GetEvents() {
		if e.GetSeq() == seq {
			if !bytes.Equal(e.GetHash(), hash) {
				return fmt.Errorf("anchor does NOT match: record %d has hash %x, the anchor says %x: the trail up to it was rewritten (with the broker's key)", seq, e.GetHash(), hash)
			}
			fmt.Fprintf(w, "anchor %d matches: nothing up to it was changed or removed\n", seq)
			return nil
		}
	}
	return fmt.Errorf("anchor NOT found: the trail has no record %d; it was removed", seq)
}

// auditEventJSON is an audit record as 'audit list --json' writes it.
type auditEventJSON struct {
	Seq            uint64 `json:"seq"`
	Time           string `json:"time"`
	Kind           string `json:"kind"`
	Node           string `json:"node,omitempty"`
	Key            string `json:"key,omitempty"`
	KeyVersion     uint32 `json:"key_version,omitempty"`
	LayerDigest    string `json:"layer_digest,omitempty"`
	Policy         string `json:"policy,omitempty"`
	PolicyRevision uint32 `json:"policy_revision,omitempty"`
	Allowed        bool   `json:"allowed"`
	Reason         string `json:"reason,omitempty"`
	Actor          string `json:"actor,omitempty"`
	Hash           string `json:"hash,omitempty"`
}

func auditJSON(e *apiv1.AuditEvent) auditEventJSON {
	return auditEventJSON{Seq: e.GetSeq(), Time: time.Unix(0, e.GetTimeUnixNano()).UTC().Format(time.RFC3339Nano), Kind: e.GetKind(),
		Node: e.GetNode(), Key: e.GetKey(), KeyVersion: e.GetKeyVersion(), LayerDigest: e.GetLayerDigest(), Policy: e.GetPolicy(),
		PolicyRevision: e.GetPolicyRevision(), Allowed: e.GetAllowed(), Reason: e.GetReason(), Actor: e.GetActor(), Hash: hex.EncodeToString(e.GetHash())}
}

func auditRow(e *apiv1.AuditEvent) []string {
	verdict := "deny"
	if e.GetAllowed() {
		verdict = "ok"
	}
	key := dash(e.GetKey())
	if e.GetKeyVersion() != 0 {
		key += fmt.Sprintf("@%d", e.GetKeyVersion())
	}
	pol := dash(e.GetPolicy())
	if e.GetPolicyRevision() != 0 {
		pol += fmt.Sprintf("@%d", e.GetPolicyRevision())
	}
	layer := dash(e.GetLayerDigest())
	if algo, hexd, ok := strings.Cut(layer, ":"); ok && len(hexd) > 12 {
		layer = algo + ":" + hexd[:12]
	}
	return []string{fmt.Sprint(e.GetSeq()), time.Unix(0, e.GetTimeUnixNano()).UTC().Format(time.RFC3339),
		e.GetKind(), verdict, dash(e.GetNode()), key, pol, layer, e.GetReason()}
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
