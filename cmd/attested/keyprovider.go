package main

import (
	"github.com/attested-dev/attested/cmd/internal/execmode"
	"github.com/spf13/cobra"
)

func keyproviderCmd(c *config) *cobra.Command {
	return &cobra.Command{
		Use: "keyprovider",
		Example: `  OCICRYPT_KEYPROVIDER_CONFIG=/etc/attested/ocicrypt-exec.json skopeo copy --decryption-key provider:attested docker://registry/app:1 oci:app
  echo '{"op":"keyunwrap",...}' | attested keyprovider --config /etc/attested/node.yaml`,
		Short: "ocicrypt keyprovider, exec mode: one JSON request on stdin, one reply on stdout",
		Long: `ocicrypt keyprovider, exec mode. Point OCICRYPT_KEYPROVIDER_CONFIG at a file with
  {"key-providers":{"attested":{"cmd":{"path":"/usr/local/bin/attested","args":["keyprovider"]}}}}
Errors go to stderr with a non-zero exit; the request is never logged.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return execmode.Run(c, cmd.InOrStdin(), cmd.OutOrStdout())
		},
	}
}
