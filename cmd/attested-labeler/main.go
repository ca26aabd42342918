// Command attested-labeler keeps Kubernetes Node labels in step with the
// broker's trust status; see package labelercmd. It is a binary of its
// own so that client-go stays out of the attested binary, which runs once
// per image layer in exec mode.
package main

import (
	"fmt"
	"os"

	"github.com/attested-dev/attested/cmd/internal/labelercmd"
)

func main() {
	if err := labelercmd.New().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, labelercmd.Name+":", err)
		os.Exit(1)
	}
}
