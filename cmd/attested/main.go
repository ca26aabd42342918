// Command attested is the one binary for all roles: ocicrypt keyprovider
// (exec and gRPC agent), node attester, key broker and its admin client.
package main

import (
	"fmt"
	"os"

	"github.com/attested-dev/attested/cmd/internal/buildinfo"
	"github.com/attested-dev/attested/cmd/internal/execmode"
	"github.com/spf13/cobra"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "attested:", plainError(err))
		os.Exit(1)
	}
}

// plainError is err's text without gRPC's status framing.
func plainError(err error) string { return execmode.PlainError(err) }

// version is the binary's version line.
func version() string { return buildinfo.String("attested") }

func newRoot() *cobra.Command {
	root, _ := newRootConfig()
	return root
}

// newRootConfig returns the command tree and the configuration its flags
// and config file fill.
func newRootConfig() (*cobra.Command, *config) {
	cfg := defaults()
	root := &cobra.Command{
		Use:           "attested",
		Short:         "Run encrypted container images only on TPM-attested hosts",
		Version:       version(),
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return loadConfig(cmd, &cfg)
		},
	}
	root.SetVersionTemplate("{{.Version}}\n")
	configFlags(root.PersistentFlags(), &cfg)
	root.AddCommand(
		keyproviderCmd(&cfg),
		agentCmd(&cfg),
		brokerCmd(),
		nodeCmd(&cfg),
		keyCmd(&cfg),
		policyCmd(&cfg),
		auditCmd(&cfg),
		earCmd(&cfg),
		webhookCmd(&cfg),
		&cobra.Command{
			Use: "version", Short: "Print the version", Args: cobra.NoArgs,
			Example: "  attested version\n  attested --version",
			// No configuration is read: the version prints anywhere.
			PersistentPreRunE: func(*cobra.Command, []string) error { return nil },
			Run:               func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), version()) },
		},
		labelerCmd(),
	)
	return root, &cfg
}
