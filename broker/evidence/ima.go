package evidence

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// IMAPCR is the PCR IMA extends.
const IMAPCR = 10

// IMAEntry is one measurement of the IMA runtime list (ima-ng template).
type IMAEntry struct {
	Path      string
	Algorithm string
	Digest    []byte
}

// maxIMAEntries bounds work on hostile logs.
const maxIMAEntries = 1 << 20

// IMASummary is what is kept of an established IMA log.
type IMASummary struct {
	// Measurements counts the measured files (violations excluded).
	Measurements int
}

// IMALog is what a replayed IMA log establishes.
type IMALog struct {
	// Entries are the measurements of the quoted prefix, violations left
	// out. Nil when PCR 10 was never extended (IMA measured nothing).
	Entries []IMAEntry
	// Violations counts the quoted prefix's measurement violations.
	Violations int
}

// ReplayIMA parses the binary runtime measurement list
// (/sys/kernel/security/ima/binary_runtime_measurements) and replays it
// into PCR 10 of the SHA-256 bank, where each entry extends SHA-256 of its
// template data (the kernel's per-bank template digest). Only the ima-ng
// template is accepted: the legacy ima template carries SHA-1 file
// digests, which we do not trust. Entries past the quoted value (appended
// after the quote) are dropped; the quoted prefix must replay exactly.
//
// An entry with an all-zero template hash is a violation (a file opened
// for write while IMA measured it, or measured while open for write): the
// kernel extends all ones instead of the template data's digest, so the
// digest proves nothing about its path or file digest. Violations are
// counted, never listed as measured files.
func ReplayIMA(raw []byte, quotedPCR10 []byte) (IMALog, error) {
	if len(raw) > MaxLogSize {
		return IMALog{}, fmt.Errorf("IMA log is %d bytes, limit %d", len(raw), MaxLogSize)
	}
	r := bytes.NewReader(raw)
	pcr := make([]byte, sha256.Size)
	out := []IMAEntry{}
	violations := 0
	// The list grows while a node reads it; the quote covers a prefix.
	matched, matchedViolations := -1, 0
	if bytes.Equal(pcr, quotedPCR10) {
		matched = 0
	}
	for n := 0; r.Len() > 0; n++ {
		if n >= maxIMAEntries {
			return IMALog{}, fmt.Errorf("IMA log has more than %d entries", maxIMAEntries)
		}
		var hdr struct {
			PCR      uint32
			SHA1     [20]byte
			NameSize uint32
		}
		if err := binary.Read(r, binary.LittleEndian, &hdr); err != nil {
			return IMALog{}, fmt.Errorf("IMA log entry %d: truncated header", n)
		}
		if hdr.PCR != IMAPCR {
			return IMALog{}, fmt.Errorf("IMA log entry %d: PCR %d, want %d", n, hdr.PCR, IMAPCR)
		}
		name, err := readN(r, hdr.NameSize, 255)
		if err != nil {
			return IMALog{}, fmt.Errorf("IMA log entry %d: template name: %v", n, err)
		}
		if string(name) != "ima-ng" {
			return IMALog{}, fmt.Errorf("IMA log entry %d: template %q is not supported (configure ima_template=ima-ng)", n, name)
		}
		var dataSize uint32
		if err := binary.Read(r, binary.LittleEndian, &dataSize); err != nil {
			return IMALog{}, fmt.Errorf("IMA log entry %d: truncated template data size", n)
		}
		data, err := readN(r, dataSize, 1<<16)
		if err != nil {
			return IMALog{}, fmt.Errorf("IMA log entry %d: template data: %v", n, err)
		}
		e, err := parseIMANG(data)
		if err != nil {
			return IMALog{}, fmt.Errorf("IMA log entry %d: %v", n, err)
		}
		digest := sha256.Sum256(data)
		violation := hdr.SHA1 == ([20]byte{})
		if violation {
			// The kernel extends all ones, whatever the template data.
			digest = [32]byte{}
			for i := range digest {
				digest[i] = 0xff
			}
			violations++
		} else {
			out = append(out, e)
		}
		h := sha256.New()
		h.Write(pcr)
		h.Write(digest[:])
		pcr = h.Sum(nil)
		if bytes.Equal(pcr, quotedPCR10) {
			matched, matchedViolations = len(out), violations
		}
	}
	if matched < 0 {
		return IMALog{}, fmt.Errorf("IMA log does not replay to the quoted value of PCR %d", IMAPCR)
	}
	if matched == 0 && matchedViolations == 0 {
		// PCR 10 in its reset state: IMA measured nothing (not running),
		// whatever the log says. No facts, so IMA policies fail.
		return IMALog{}, nil
	}
	return IMALog{Entries: out[:matched:matched], Violations: matchedViolations}, nil
}

func readN(r *bytes.Reader, n, limit uint32) ([]byte, error) {
	if n > limit {
		return nil, fmt.Errorf("length %d exceeds %d", n, limit)
	}
	if int(n) > r.Len() {
		return nil, errors.New("truncated")
	}
	b := make([]byte, n)
	_, err := r.Read(b)
	return b, err
}

// parseIMANG reads the ima-ng template data: a length-prefixed
// "algo:\0digest" field and a length-prefixed NUL-terminated path.
func parseIMANG(data []byte) (IMAEntry, error) {
	r := bytes.NewReader(data)
	var l uint32
	if err := binary.Read(r, binary.LittleEndian, &l); err != nil {
		return IMAEntry{}, errors.New("ima-ng: truncated digest field")
	}
	field, err := readN(r, l, 1024)
	if err != nil {
		return IMAEntry{}, fmt.Errorf("ima-ng: digest field: %v", err)
	}
	algo, digest, ok := bytes.Cut(field, []byte(":\x00"))
	if !ok {
		return IMAEntry{}, errors.New("ima-ng: digest field has no algorithm")
	}
	if err := binary.Read(r, binary.LittleEndian, &l); err != nil {
		return IMAEntry{}, errors.New("ima-ng: truncated path field")
	}
	path, err := readN(r, l, 4096)
	if err != nil {
		return IMAEntry{}, fmt.Errorf("ima-ng: path: %v", err)
	}
	if r.Len() != 0 {
		return IMAEntry{}, errors.New("ima-ng: trailing template data")
	}
	return IMAEntry{Path: strings.TrimRight(string(path), "\x00"), Algorithm: string(algo), Digest: digest}, nil
}
