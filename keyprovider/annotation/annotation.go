// Package annotation is the versioned document attested stores in a layer's
// org.opencontainers.image.enc.keys.provider.<name> annotation: which broker
// and key version sealed the layer key, with which HPKE suite, and the
// ciphertext. It is self-describing because ocicrypt never tells a provider
// its own name, and images travel between registries and hosts.
package annotation

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Version is the current format version.
const Version = 1

// MaxSize bounds what we parse; a real annotation is a few KiB.
const MaxSize = 64 << 10

// MaxRecipients bounds the keys one layer is sealed for, and so the work
// one unwrap can ask of the broker.
const MaxRecipients = 16

// Recipient is the layer key sealed to one broker key version.
type Recipient struct {
	Key        string `json:"key"`
	KeyVersion uint32 `json:"kv"`
	Suite      string `json:"suite"`
	Ciphertext []byte `json:"ct"`
}

// Annotation is the whole document.
type Annotation struct {
	Format     string      `json:"attested"`
	Version    int         `json:"v"`
	Broker     string      `json:"broker"`
	Recipients []Recipient `json:"recipients"`
}

const formatTag = "layer-key"

// ErrNotOurs marks bytes that are not an attested annotation at all.
var ErrNotOurs = errors.New("annotation: not an attested annotation (made by another keyprovider?)")

// ValidKeyName reports whether name is a usable key name. Names travel in
// provider parameters, so they must not contain ',' (clients split on it)
// or ':' or '='.
func ValidKeyName(name string) bool { return validName(name, "._-") }

// validName reports whether s is 1-63 characters, starting with a letter
// or digit, then letters, digits or the given punctuation.
func validName(s, punct string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i, c := range []byte(s) {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || !strings.ContainsRune(punct, rune(c))) {
			return false
		}
	}
	return true
}

// ValidName applies the key name rules to other names (nodes, policies).
func ValidName(s string) bool { return validName(s, "._-") }

// ValidTagName is a name that may also hold '/' (e.g. topology/zone).
func ValidTagName(s string) bool { return validName(s, "._/-") }

// New returns an annotation for broker with the given recipients.
func New(broker string, rs ...Recipient) Annotation {
	return Annotation{Format: formatTag, Version: Version, Broker: broker, Recipients: rs}
}

// Marshal encodes the annotation.
func (a Annotation) Marshal() ([]byte, error) {
	if err := a.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(a)
}

// Parse decodes and validates an annotation.
func Parse(data []byte) (Annotation, error) {
	var a Annotation
	if len(data) > MaxSize {
		return a, fmt.Errorf("annotation: %d bytes is larger than the %d-byte limit", len(data), MaxSize)
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return a, ErrNotOurs
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(&a); err != nil {
		return Annotation{}, ErrNotOurs
	}
	if a.Format != formatTag {
		return Annotation{}, ErrNotOurs
	}
	if dec.More() {
		return Annotation{}, errors.New("annotation: trailing data after the document")
	}
	if a.Version != Version {
		return Annotation{}, fmt.Errorf("annotation: format version %d is not supported (this build reads version %d)", a.Version, Version)
	}
	if err := a.validate(); err != nil {
		return Annotation{}, err
	}
	return a, nil
}

func (a Annotation) validate() error {
	if a.Broker == "" {
		return errors.New("annotation: no broker identity")
	}
	if len(a.Recipients) == 0 {
		return errors.New("annotation: no recipients")
	}
	if len(a.Recipients) > MaxRecipients {
		return fmt.Errorf("annotation: %d recipients, at most %d", len(a.Recipients), MaxRecipients)
	}
	for i, r := range a.Recipients {
		if !ValidKeyName(r.Key) {
			return fmt.Errorf("annotation: recipient %d: invalid key name %q", i, r.Key)
		}
		if r.KeyVersion == 0 {
			return fmt.Errorf("annotation: recipient %d: key version missing", i)
		}
		if r.Suite == "" || len(r.Ciphertext) == 0 {
			return fmt.Errorf("annotation: recipient %d: suite or ciphertext missing", i)
		}
	}
	return nil
}

// Info is the HPKE info that binds a sealed layer key to its broker, key
// version and suite, so a ciphertext cannot be replayed under another label.
func Info(broker string, r Recipient) []byte {
	return fmt.Appendf(nil, "attested/v1/layer-key\x00%s\x00%s\x00%d\x00%s", broker, r.Key, r.KeyVersion, r.Suite)
}
