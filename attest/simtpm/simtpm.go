// Package simtpm plugs the go-tpm-tools simulator into attest.OpenTPM as
// "simulator". Import it for its side effect in tests; the attested binary
// links it only when built with -tags simulator.
//
// The simulator is one per process (its C state is global): every open
// shares it, one user at a time, and Close leaves it running.
package simtpm

import (
	"io"
	"sync"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/attested-dev/attested/attest"
)

var (
	once sync.Once
	sim  *simulator.Simulator
	err  error
	mu   sync.Mutex
)

func init() { attest.RegisterSimulator(open) }

// Simulator returns the process's simulator, for tests that extend PCRs or
// reset it. It must not be used while a TPM from OpenTPM is open.
func Simulator() (*simulator.Simulator, error) {
	once.Do(func() { sim, err = simulator.Get() })
	return sim, err
}

type shared struct{ *simulator.Simulator }

func (shared) Close() error { mu.Unlock(); return nil }

func open() (io.ReadWriteCloser, error) {
	s, err := Simulator()
	if err != nil {
		return nil, err
	}
	mu.Lock()
	return shared{s}, nil
}
