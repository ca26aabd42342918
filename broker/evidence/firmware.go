// Package evidence turns a node's event logs into facts the broker can
// trust: a log counts only if it replays to PCR values a verified quote
// covered, and facts are read only from events that replayed.
package evidence

import (
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode/utf16"

	"github.com/google/go-attestation/attest"
)

// MaxLogSize bounds an event log; real firmware logs are tens of KiB and
// IMA logs grow with the files a host runs.
const MaxLogSize = 8 << 20

// TCG event types used below (TCG PC Client Platform Firmware Profile).
const (
	evIPL                   = 0x0000000D
	evEFIBootServicesApp    = 0x80000003
	pcrBootApplications     = 4
	pcrGrubCommands         = 8
	pcrSystemdStubCmdline   = 12
	grubKernelCmdlinePrefix = "kernel_cmdline: "
)

// BootApp is an EFI application the firmware loaded (PCR 4).
type BootApp struct {
	Event  int
	Digest []byte
}

// Facts are what the broker established from replayed logs.
type Facts struct {
	// FirmwareLog is true when a firmware event log replayed.
	FirmwareLog bool
	// SecureBoot is nil when unknown (no firmware log).
	SecureBoot *bool
	// SecureBootAuthorities are the subjects of the keys that verified
	// boot components.
	SecureBootAuthorities []string
	BootApps              []BootApp
	KernelCmdlines        []string
	// IMA is nil when the node sent no IMA log.
	IMA []IMAEntry
	// CertifiedTagDigest is the tag digest the node's TPM certified with
	// its AK (nil when the node has no tag index).
	CertifiedTagDigest []byte `json:",omitempty"`
}

// ReplayFirmware parses a TCG firmware event log, replays it against the
// quoted SHA-256 PCRs and derives facts. A log that does not replay is an
// error naming the PCRs.
func ReplayFirmware(raw []byte, pcrs map[int][]byte) (Facts, error) {
	var f Facts
	if len(raw) > MaxLogSize {
		return f, fmt.Errorf("firmware event log is %d bytes, limit %d", len(raw), MaxLogSize)
	}
	el, err := attest.ParseEventLog(raw)
	if err != nil {
		return f, fmt.Errorf("firmware event log does not parse: %v", err)
	}
	events, err := el.Verify(attestPCRs(pcrs))
	if err != nil {
		var re attest.ReplayError
		if errors.As(err, &re) {
			return f, fmt.Errorf("firmware event log does not replay to the quoted value of PCR %s", joinInts(re.InvalidPCRs))
		}
		return f, fmt.Errorf("firmware event log does not replay: %v", err)
	}
	// go-attestation treats a PCR without events as replayed. Facts come
	// from PCRs 4, 7, 8 and 12, so a log that leaves one out while the TPM
	// measured into it would hide what was measured there.
	covered := map[int]bool{}
	for _, e := range events {
		covered[e.Index] = true
	}
	for _, i := range factPCRs {
		if v, ok := pcrs[i]; ok && !covered[i] && !isReset(v) {
			return f, fmt.Errorf("firmware event log has no events for PCR %d, but the TPM measured into it", i)
		}
	}
	f.FirmwareLog = true
	sb, err := attest.ParseSecurebootState(events)
	if err != nil {
		return f, fmt.Errorf("firmware event log: Secure Boot state: %v", err)
	}
	f.SecureBoot = &sb.Enabled
	for _, c := range append(sb.PreSeparatorAuthority, sb.PostSeparatorAuthority...) {
		f.SecureBootAuthorities = append(f.SecureBootAuthorities, c.Subject.String())
	}
	for i, e := range events {
		switch {
		case e.Index == pcrBootApplications && uint32(e.Type) == evEFIBootServicesApp:
			f.BootApps = append(f.BootApps, BootApp{Event: i, Digest: e.Digest})
		case e.Index == pcrGrubCommands && uint32(e.Type) == evIPL:
			s := strings.TrimRight(string(e.Data), "\x00")
			if cmd, ok := strings.CutPrefix(s, grubKernelCmdlinePrefix); ok {
				f.KernelCmdlines = append(f.KernelCmdlines, cmd)
			}
		case e.Index == pcrSystemdStubCmdline && uint32(e.Type) == evIPL:
			if cmd, ok := utf16String(e.Data); ok {
				f.KernelCmdlines = append(f.KernelCmdlines, cmd)
			}
		}
	}
	return f, nil
}

// factPCRs are the PCRs facts are read from.
var factPCRs = []int{pcrBootApplications, 7, pcrGrubCommands, pcrSystemdStubCmdline}

func isReset(v []byte) bool {
	for _, b := range v {
		if b != 0 {
			return false
		}
	}
	return true
}

func attestPCRs(pcrs map[int][]byte) []attest.PCR {
	out := make([]attest.PCR, 0, len(pcrs))
	for i, d := range pcrs {
		out = append(out, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Index < out[b].Index })
	return out
}

func utf16String(b []byte) (string, bool) {
	if len(b)%2 != 0 || len(b) == 0 {
		return "", false
	}
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = uint16(b[2*i]) | uint16(b[2*i+1])<<8
	}
	return strings.TrimRight(string(utf16.Decode(u)), "\x00"), true
}

func joinInts(v []int) string {
	parts := make([]string, len(v))
	for i, n := range v {
		parts[i] = fmt.Sprint(n)
	}
	return strings.Join(parts, ", ")
}

// Lines renders the facts for explanations, one per line.
func (f Facts) Lines() []string {
	var out []string
	if !f.FirmwareLog {
		out = append(out, "firmware event log: none sent")
	} else {
		out = append(out, "firmware event log: replays to the quoted PCRs")
		out = append(out, fmt.Sprintf("Secure Boot: %s", onOff(*f.SecureBoot)))
		for _, a := range f.SecureBootAuthorities {
			out = append(out, "Secure Boot authority: "+a)
		}
		for _, b := range f.BootApps {
			out = append(out, fmt.Sprintf("boot application (event %d): %s", b.Event, hex.EncodeToString(b.Digest)))
		}
		for _, c := range f.KernelCmdlines {
			out = append(out, "kernel command line: "+c)
		}
	}
	if f.CertifiedTagDigest == nil {
		out = append(out, "TPM-certified tags: none")
	} else {
		out = append(out, fmt.Sprintf("TPM-certified tag digest: %s", hex.EncodeToString(f.CertifiedTagDigest)))
	}
	if f.IMA == nil {
		out = append(out, "IMA log: none sent")
	} else {
		out = append(out, fmt.Sprintf("IMA log: %d measurements replay to PCR 10", len(f.IMA)))
	}
	return out
}

func onOff(b bool) string {
	if b {
		return "enabled"
	}
	return "disabled"
}
