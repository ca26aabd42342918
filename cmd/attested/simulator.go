//go:build simulator

package main

// Built with -tags simulator, --tpm simulator runs the in-process TPM
// simulator (cgo, OpenSSL) for experiments; production builds leave it out.
import _ "github.com/attested-dev/attested/attest/simtpm"
