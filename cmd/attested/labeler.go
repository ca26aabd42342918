package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
)

// labelerBinary is the labeler's own binary (cmd/attested-labeler): it
// links client-go, whose package initialisation every exec-mode
// keyprovider call (one process per image layer) would otherwise pay.
const labelerBinary = "attested-labeler"

func labelerCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "labeler [flags]",
		Short: "Keep Kubernetes Node labels in step with the broker's trust status (runs " + labelerBinary + ")",
		Long: `Keep Kubernetes Node labels (attested.dev/trusted=true|false, attested.dev/TAG=VALUE
for certified tags) in step with the broker's node status. This runs
` + labelerBinary + ` (beside this binary, else on PATH) with the same arguments;
'attested labeler --help' shows its flags.`,
		Example: `  attested labeler --once --kubeconfig ~/.kube/config --broker localhost:8443 \
      --broker-ca ./broker/ca.pem --admin-token-file ~/attested-admin.token`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			bin, err := findLabeler()
			if err != nil {
				return err
			}
			return syscall.Exec(bin, append([]string{bin}, args...), os.Environ())
		},
	}
}

// findLabeler looks beside the running binary first, so that an installed
// pair runs together, then on PATH.
func findLabeler() (string, error) {
	if self, err := os.Executable(); err == nil {
		bin := filepath.Join(filepath.Dir(self), labelerBinary)
		if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return bin, nil
		}
	}
	bin, err := exec.LookPath(labelerBinary)
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("labeler: %s is not installed beside this binary or on PATH (build it: make build, or go build ./cmd/%s)", labelerBinary, labelerBinary)
		}
		return "", fmt.Errorf("labeler: %w", err)
	}
	return bin, nil
}
