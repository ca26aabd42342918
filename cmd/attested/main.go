// Command attested is the one binary for all roles: ocicrypt keyprovider
// (exec and gRPC agent), node attester, key broker and its admin client.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "attested:", err)
		os.Exit(1)
	}
}

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
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return loadConfig(cmd, &cfg)
		},
	}
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
		labelerCmd(),
	)
	return root, &cfg
}
