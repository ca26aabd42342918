package attest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/renameio/v2"
)

// StateFile is the node's enrollment record inside its state directory.
const StateFile = "node.json"

// State is what a node keeps after enrollment. The AK blob is the TPM's
// own wrapping of the key (usable only inside that TPM); the file is still
// 0600 in a 0700 directory.
type State struct {
	Name          string `json:"name"`
	Broker        string `json:"broker"`
	EKFingerprint string `json:"ekFingerprint"`
	AKBlob        []byte `json:"akBlob"`
}

// LoadState reads the node state from dir.
func LoadState(dir string) (*State, error) {
	data, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("attest: this node is not enrolled (no %s in %s); run 'attested node enroll'", StateFile, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("attest: node state: %w", err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("attest: node state %s: %w", filepath.Join(dir, StateFile), err)
	}
	if s.Name == "" || len(s.AKBlob) == 0 {
		return nil, fmt.Errorf("attest: node state %s is incomplete; enroll again", filepath.Join(dir, StateFile))
	}
	return &s, nil
}

// Save writes the state atomically: a crash leaves the old file or the new
// one, never half of either.
func (s *State) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("attest: state dir: %w", err)
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := renameio.WriteFile(filepath.Join(dir, StateFile), data, 0o600); err != nil {
		return fmt.Errorf("attest: save node state: %w", err)
	}
	return nil
}
