package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/metadata"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

func webhookCmd(c *config) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "webhook",
		Short: "Send node status changes and refusals to HTTPS receivers (admin)",
		Long: `Webhooks tell a receiver (an alerting system, a chat bridge, a SIEM) when a node's
trust status changes and when a release or an attestation is refused.

Each event is a JSON POST signed with the webhook's secret:

  Attested-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

Receivers verify the HMAC over the raw body and refuse timestamps more than a few
minutes old (replays). Events wait in the broker's store until delivered, so a
broker restart loses none; failed deliveries are retried with backoff, and any
given up is counted under FAILED in 'webhook list', in the metrics and in the audit.`,
	}

	var events []string
	var insecureHTTP bool
	var secretFile string
	add := &cobra.Command{
		Use:   "add URL [--events status,refusal]",
		Short: "Add a webhook and print its signing secret (shown once)",
		Long: `Add a webhook that receives the named events: "status" (node status changes) and
"refusal" (refused releases and attestations). The URL must be https:// (trusted
through the system roots, or webhooks.caFile in broker.yaml); plain http:// is
refused unless --insecure-http says so, for a receiver on the broker's host.

The signing secret is printed once (or written to --secret-file); the broker keeps
it sealed under its master key and never shows it again.`,
		Example: `  attested webhook add https://alerts.example.com/attested --events status,refusal
  attested webhook add https://alerts.example.com/attested --secret-file /etc/alerts/attested.secret
  attested webhook add http://127.0.0.1:9000/hook --insecure-http`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if secretFile != "" {
				if _, err := os.Lstat(secretFile); err == nil {
					return fmt.Errorf("--secret-file %q exists; name a new file (the secret is written once, never over another file)", secretFile)
				}
			}
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				if insecureHTTP {
					ctx = metadata.AppendToOutgoingContext(ctx, broker.InsecureHTTPMetadata, "true")
				}
				w, err := a.AddWebhook(ctx, &apiv1.AddWebhookRequest{Url: args[0], Events: events})
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				fmt.Fprintf(out, "webhook %s added: %s (events %s)\n", w.GetId(), w.GetUrl(), strings.Join(w.GetEvents(), ","))
				if secretFile != "" {
					if err := writeSecretFile(secretFile, w.GetSecret()+"\n"); err != nil {
						return fmt.Errorf("webhook %s was added, but its secret could not be written: %w; remove it ('attested webhook remove %s') and add it again", w.GetId(), err, w.GetId())
					}
					fmt.Fprintf(out, "signing secret written to %s (mode 0600); it is not shown again\n", secretFile)
					return nil
				}
				fmt.Fprintf(out, "signing secret (shown once; give it to the receiver now): %s\n", w.GetSecret())
				return nil
			})
		},
	}
	add.Flags().StringSliceVar(&events, "events", []string{broker.EventStatus, broker.EventRefusal}, "events to send: status, refusal")
	add.Flags().BoolVar(&insecureHTTP, "insecure-http", false, "allow a plain http:// URL (events cross the network in clear; for a receiver on this host)")
	add.Flags().StringVar(&secretFile, "secret-file", "", "write the signing secret to this new file (0600) instead of printing it")

	list := &cobra.Command{
		Use:     "list",
		Short:   "List webhooks and their delivery counts",
		Long:    "List webhooks: PENDING events wait in the outbox, DELIVERED were accepted (2xx), FAILED were given up (out of attempts, too old, or pushed out of a full outbox).",
		Example: "  attested webhook list",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.ListWebhooks(ctx, &apiv1.ListWebhooksRequest{})
				if err != nil {
					return err
				}
				var rows [][]string
				for _, w := range r.GetWebhooks() {
					rows = append(rows, []string{w.GetId(), w.GetUrl(), strings.Join(w.GetEvents(), ","),
						fmt.Sprint(w.GetPending()), fmt.Sprint(w.GetDelivered()), fmt.Sprint(w.GetFailedAttempts()),
						unixTime(w.GetCreatedUnix()), dash(w.GetLastError())})
				}
				table(cmd.OutOrStdout(), "ID\tURL\tEVENTS\tPENDING\tDELIVERED\tFAILED\tCREATED\tLAST ERROR", rows)
				return nil
			})
		},
	}

	remove := &cobra.Command{
		Use:     "remove ID",
		Short:   "Remove a webhook; its pending events are discarded",
		Example: "  attested webhook remove wh_0123456789abcdef",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				w, err := a.RemoveWebhook(ctx, &apiv1.WebhookRequest{Id: args[0]})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "webhook %s removed (%s); %d pending event(s) discarded\n", w.GetId(), w.GetUrl(), w.GetPending())
				return nil
			})
		},
	}

	test := &cobra.Command{
		Use:   "test ID",
		Short: "Send a signed test event now and print the receiver's answer",
		Long: `Send a test event ("kind": "test") to the webhook now, signed like every delivery,
and print the receiver's answer. Exits non-zero if it was not accepted (2xx).`,
		Example: "  attested webhook test wh_0123456789abcdef",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withAdmin(c, func(ctx context.Context, a apiv1.AdminClient) error {
				r, err := a.TestWebhook(ctx, &apiv1.WebhookRequest{Id: args[0]})
				if err != nil {
					return err
				}
				if !r.GetDelivered() {
					return fmt.Errorf("webhook %s: test event not delivered: %s", args[0], r.GetDetail())
				}
				fmt.Fprintf(cmd.OutOrStdout(), "webhook %s: %s\n", args[0], r.GetDetail())
				return nil
			})
		},
	}
	cmd.AddCommand(add, list, remove, test)
	return cmd
}
