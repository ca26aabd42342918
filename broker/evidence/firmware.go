// Package evidence turns a node's event logs into facts the broker can
// trust: a log counts only if it replays to PCR values a verified quote
// covered, and facts are read only from event content that the replayed
// digests prove. What a fact PCR holds but the parser cannot prove leaves
// the fact unestablished (absent), or counts against the node.
package evidence

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/google/go-attestation/attest"
)

// MaxLogSize bounds an event log; real firmware logs are tens of KiB and
// IMA logs grow with the files a host runs.
const MaxLogSize = 8 << 20

// TCG event types used below (TCG PC Client Platform Firmware Profile).
const (
	evSeparator          = 0x00000004
	evIPL                = 0x0000000D
	evEFIBootServicesApp = 0x80000003
	evEFIAction          = 0x80000007

	pcrBootApplications = 4
	pcrSecureBoot       = 7
	pcrGrub             = 8
	pcrKernelConfig     = 12
)

// BootApp is a measurement in PCR 4 that the broker cannot prove to be
// anything but a boot application: every EV_EFI_BOOT_SERVICES_APPLICATION,
// and any other event whose content its digest does not prove (the event
// type is not covered by the digest, so a re-typed application is still an
// application). Digest is what was extended: for an EFI application, its
// Authenticode hash.
type BootApp struct {
	Event  int
	Digest []byte
	// LoggedType is the event type the log gives, when it is not
	// EV_EFI_BOOT_SERVICES_APPLICATION: the log claims something else, but
	// the digest does not prove it.
	LoggedType string `json:",omitempty"`
}

// Facts are what the broker established from replayed logs. A fact that
// was not established is nil (absent), never an empty value: policies and
// expressions refuse on absent facts.
type Facts struct {
	// FirmwareLog is true when a firmware event log replayed.
	FirmwareLog bool
	// SecureBoot is nil when unknown (no firmware log, or PCR 7 was never
	// extended).
	SecureBoot *bool
	// SecureBootAuthorities are the subjects of the keys that verified
	// boot components.
	SecureBootAuthorities []string
	// BootApps is nil when unknown: no firmware log, or no application
	// measured into PCR 4.
	BootApps []BootApp
	// KernelCmdlines are the kernel command lines measured into PCR 8
	// (GRUB, or systemd-stub before v251) and PCR 12 (systemd-stub), each
	// proven by its digest. Nil when not established: no firmware log, none
	// measured, or an event in PCR 8 or 12 whose content the parser cannot
	// prove (it could be a command line in disguise).
	KernelCmdlines []string
	// BootloaderCommands are the loader commands GRUB measured into PCR 8
	// (linux, chainloader, multiboot, module: their arguments reach a
	// kernel), proven by their digests. Forbidden kernel parameters are
	// looked for in them too, since GRUB's string kind ("kernel_cmdline: "
	// or "grub_cmd: ") is not covered by the digest.
	BootloaderCommands []string `json:",omitempty"`
	// KernelCmdlineUnknown says why KernelCmdlines was not established
	// although the firmware log replayed.
	KernelCmdlineUnknown string `json:",omitempty"`
	// IMA lists the files IMA measured: nil when the node sent no IMA log,
	// or PCR 10 was never extended. Violations are not listed. The list can
	// be megabytes, so it is never stored: it exists while the evidence is
	// appraised, and sessions keep the verdicts of the IMA clauses instead
	// (see IMASummary).
	IMA []IMAEntry `json:"-"`
	// IMASummary is what is kept of an established IMA log: nil when there
	// is none (as IMA).
	IMASummary *IMASummary `json:",omitempty"`
	// IMAViolations counts the IMA log's measurement violations in the
	// quoted prefix: entries whose file content IMA could not measure.
	IMAViolations int `json:",omitempty"`
	// FirmwareLogSHA256 and IMALogSHA256 identify the logs the facts came
	// from; the logs themselves are not kept.
	FirmwareLogSHA256 []byte `json:",omitempty"`
	IMALogSHA256      []byte `json:",omitempty"`
	// CertifiedTagDigest is the tag digest the node's TPM certified with
	// its AK (nil when the node has no tag index).
	CertifiedTagDigest []byte `json:",omitempty"`
}

// ReplayFirmware parses a TCG firmware event log, replays it against the
// quoted SHA-256 PCRs and derives facts. A log that does not replay is an
// error naming the PCRs.
//
// Only event content that its digest proves is read. The event type and,
// for most events, the event data are not covered by the digest, so:
//   - PCR 7 (Secure Boot) is read by go-attestation's ParseSecurebootState,
//     which refuses an event type unexpected in PCR 7 and checks that the
//     digest of every variable, authority, action and separator event is
//     the hash of its data.
//   - PCR 4 (boot applications): every event except a proven separator or
//     EFI action counts as a boot application, whatever its logged type.
//   - PCR 8 and 12 (kernel command line): every event must be a GRUB string
//     or a UTF-16 command line whose digest matches; otherwise no command
//     line is established.
//
// The maintained extractor, go-eventlog's tpmeventlog.ReplayAndExtract,
// does the GRUB digest checks too, but takes the PCR 4 application list
// from the untrusted event type and skips re-typed PCR 8 events, so a
// re-typed application or command line disappears without an error; it
// does not read systemd-stub's PCR 12. This parser matches its checks and
// fails closed where it does not.
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
	byPCR := map[int][]indexed{}
	for i, e := range events {
		byPCR[e.Index] = append(byPCR[e.Index], indexed{i, e})
	}
	for _, i := range factPCRs {
		if v, ok := pcrs[i]; ok && len(byPCR[i]) == 0 && !isReset(v) {
			return f, fmt.Errorf("firmware event log has no events for PCR %d, but the TPM measured into it", i)
		}
	}
	f.FirmwareLog = true
	// A fact PCR the quote did not cover proves nothing: its events were
	// not replayed (go-attestation returns only the quoted PCRs' events),
	// so the facts it holds stay absent.
	if _, ok := pcrs[pcrSecureBoot]; ok && len(byPCR[pcrSecureBoot]) > 0 {
		sb, err := attest.ParseSecurebootState(events)
		if err != nil {
			return f, fmt.Errorf("firmware event log: Secure Boot state: %v", err)
		}
		f.SecureBoot = &sb.Enabled
		for _, c := range append(sb.PreSeparatorAuthority, sb.PostSeparatorAuthority...) {
			f.SecureBootAuthorities = append(f.SecureBootAuthorities, c.Subject.String())
		}
	}
	if _, ok := pcrs[pcrBootApplications]; ok && len(byPCR[pcrBootApplications]) > 0 {
		f.BootApps = bootApps(byPCR[pcrBootApplications])
	}
	_, q8 := pcrs[pcrGrub]
	_, q12 := pcrs[pcrKernelConfig]
	if !q8 || !q12 {
		f.KernelCmdlineUnknown = "the quote does not cover PCRs 8 and 12"
	} else {
		f.KernelCmdlines, f.BootloaderCommands, f.KernelCmdlineUnknown = kernelCmdlines(byPCR[pcrGrub], byPCR[pcrKernelConfig])
	}
	return f, nil
}

// indexed is a replayed event and its position among the replayed events.
type indexed struct {
	n int
	attest.Event
}

// factPCRs are the PCRs facts are read from.
var factPCRs = []int{pcrBootApplications, pcrSecureBoot, pcrGrub, pcrKernelConfig}

// bootApps lists every PCR 4 measurement that is not a proven separator or
// EFI action. With none, nothing says what booted: nil, like an unknown.
func bootApps(events []indexed) []BootApp {
	var apps []BootApp
	for _, e := range events {
		if provenSeparator(e.Event) || provenAction(e.Event) {
			continue
		}
		app := BootApp{Event: e.n, Digest: e.Digest}
		if uint32(e.Type) != evEFIBootServicesApp {
			app.LoggedType = e.Type.String()
		}
		apps = append(apps, app)
	}
	return apps
}

// provenSeparator: an EV_SEPARATOR whose data is one of the two values the
// firmware profile allows and whose digest is their hash.
func provenSeparator(e attest.Event) bool {
	return uint32(e.Type) == evSeparator && digestIs(e.Digest, e.Data) &&
		(bytes.Equal(e.Data, []byte{0, 0, 0, 0}) || bytes.Equal(e.Data, []byte{0xff, 0xff, 0xff, 0xff}))
}

// provenAction: an EV_EFI_ACTION whose digest is the hash of its data and
// whose data is a short printable string, as every EFI action is ("Calling
// EFI Application from Boot Option"). The string check matters: without
// it, an application whose event data were its own hashed image bytes
// would pass as an action.
func provenAction(e attest.Event) bool {
	if uint32(e.Type) != evEFIAction || !digestIs(e.Digest, e.Data) || len(e.Data) == 0 || len(e.Data) > 256 {
		return false
	}
	for _, c := range e.Data {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

func digestIs(digest, data []byte) bool {
	h := sha256.Sum256(data)
	return bytes.Equal(digest, h[:])
}

// GRUB's PCR 8 string prefixes (grub-core/commands/tpm.c; the space-ended
// forms are Fedora's older patches). The digest covers the string after
// the prefix only.
var (
	grubCmdlinePrefixes = []string{"kernel_cmdline: ", "grub_kernel_cmdline "}
	grubOtherPrefixes   = []string{"grub_cmd: ", "module_cmdline: ", "grub_cmd "}
	// grubLoaders are the GRUB commands whose arguments reach a kernel.
	grubLoaders = map[string]bool{"linux": true, "linuxefi": true, "linux16": true, "chainloader": true,
		"multiboot": true, "multiboot2": true, "module": true, "module2": true}
)

// kernelCmdlines reads the kernel command lines from the PCR 8 and 12
// events. Every event there must be proven; a single unproven one leaves
// the command line unestablished, since it could be a command line whose
// text the log rewrote.
func kernelCmdlines(pcr8, pcr12 []indexed) (lines, loaderCmds []string, unknown string) {
	for _, e := range pcr8 {
		if uint32(e.Type) != evIPL {
			return nil, nil, fmt.Sprintf("PCR 8 event %d is logged as %s, whose content its digest does not prove", e.n, e.Type)
		}
		if s, kind, ok := grubString(e.Event); ok {
			switch {
			// GRUB's kernel command lines start with BOOT_IMAGE=; a line
			// relabelled as a command is still one.
			case kind == "cmdline" || strings.HasPrefix(s, "BOOT_IMAGE="):
				lines = append(lines, s)
			case grubLoaders[firstWord(s)]:
				loaderCmds = append(loaderCmds, s)
			}
			continue
		}
		// systemd-stub up to v250 measured the command line into PCR 8.
		if s, ok := utf16Line(e.Event); ok {
			lines = append(lines, s)
			continue
		}
		return nil, nil, fmt.Sprintf("PCR 8 event %d is neither a GRUB string nor a command line whose digest matches its data", e.n)
	}
	for _, e := range pcr12 {
		s, ok := "", false
		if uint32(e.Type) == evIPL {
			s, ok = utf16Line(e.Event)
		}
		if !ok {
			return nil, nil, fmt.Sprintf("PCR 12 event %d (logged as %s) is not a command line whose digest matches its data (systemd-stub's credentials and add-ons cannot be told from a rewritten command line)", e.n, e.Type)
		}
		lines = append(lines, s)
	}
	if len(lines) == 0 {
		return nil, nil, "no kernel command line was measured into PCR 8 or 12"
	}
	return lines, loaderCmds, ""
}

// grubString proves a GRUB PCR 8 string: the data is a known prefix, the
// string and a NUL; the digest is the hash of the string, without (or, for
// older GRUBs, with) the NUL. A string with a NUL inside is refused: the
// kernel would see only its first part.
func grubString(e attest.Event) (s, kind string, ok bool) {
	for _, set := range []struct {
		kind     string
		prefixes []string
	}{{"cmdline", grubCmdlinePrefixes}, {"other", grubOtherPrefixes}} {
		for _, p := range set.prefixes {
			rest, found := bytes.CutPrefix(e.Data, []byte(p))
			if !found {
				continue
			}
			body := bytes.TrimSuffix(rest, []byte{0})
			if bytes.IndexByte(body, 0) >= 0 || !utf8.Valid(body) {
				return "", "", false
			}
			if digestIs(e.Digest, body) || (len(body) < len(rest) && digestIs(e.Digest, rest)) {
				return string(body), set.kind, true
			}
			return "", "", false
		}
	}
	return "", "", false
}

// utf16Line proves a systemd-stub command line: UTF-16LE data ending in a
// NUL, whose digest is the hash of the data (systemd measures the NUL too)
// or of the data without the NUL (as systemd's documentation describes).
func utf16Line(e attest.Event) (string, bool) {
	b := e.Data
	if len(b) < 2 || len(b)%2 != 0 || b[len(b)-2] != 0 || b[len(b)-1] != 0 {
		return "", false
	}
	if !digestIs(e.Digest, b) && !digestIs(e.Digest, b[:len(b)-2]) {
		return "", false
	}
	u := make([]uint16, len(b)/2-1)
	for i := range u {
		u[i] = uint16(b[2*i]) | uint16(b[2*i+1])<<8
		if u[i] == 0 {
			return "", false
		}
	}
	// A lone surrogate has no UTF-8 form; the kernel's conversion and ours
	// could disagree on it.
	for i := 0; i < len(u); i++ {
		if !utf16.IsSurrogate(rune(u[i])) {
			continue
		}
		if i+1 == len(u) || utf16.DecodeRune(rune(u[i]), rune(u[i+1])) == utf8.RuneError {
			return "", false
		}
		i++
	}
	return string(utf16.Decode(u)), true
}

func firstWord(s string) string {
	w, _, _ := strings.Cut(strings.TrimLeft(s, " "), " ")
	return w
}

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
		if f.SecureBoot == nil {
			out = append(out, "Secure Boot: unknown (PCR 7 was never extended)")
		} else {
			out = append(out, fmt.Sprintf("Secure Boot: %s", onOff(*f.SecureBoot)))
		}
		for _, a := range f.SecureBootAuthorities {
			out = append(out, fmt.Sprintf("Secure Boot authority: %q", a))
		}
		if f.BootApps == nil {
			out = append(out, "boot applications: unknown (none measured into PCR 4)")
		}
		for _, b := range f.BootApps {
			out = append(out, fmt.Sprintf("boot application (event %d%s): %s", b.Event, b.loggedAs(), hex.EncodeToString(b.Digest)))
		}
		for _, c := range f.KernelCmdlines {
			out = append(out, fmt.Sprintf("kernel command line: %q", c))
		}
		if f.KernelCmdlines == nil {
			out = append(out, "kernel command line: not established: "+f.KernelCmdlineUnknown)
		}
	}
	if f.CertifiedTagDigest == nil {
		out = append(out, "TPM-certified tags: none")
	} else {
		out = append(out, fmt.Sprintf("TPM-certified tag digest: %s", hex.EncodeToString(f.CertifiedTagDigest)))
	}
	if f.IMASummary == nil {
		out = append(out, "IMA log: none sent, or PCR 10 never extended")
	} else {
		out = append(out, fmt.Sprintf("IMA log: %d measurements replay to PCR 10", f.IMASummary.Measurements))
	}
	if f.IMAViolations > 0 {
		out = append(out, fmt.Sprintf("IMA violations: %d (files IMA could not measure)", f.IMAViolations))
	}
	return out
}

// loggedAs says how the log labels an application event whose type the
// digest does not prove.
func (b BootApp) loggedAs() string {
	if b.LoggedType == "" {
		return ""
	}
	return ", logged as " + b.LoggedType + " but not proven to be one"
}

// Describe names the event for refusals.
func (b BootApp) Describe() string {
	if b.LoggedType == "" {
		return fmt.Sprintf("event %d EV_EFI_BOOT_SERVICES_APPLICATION", b.Event)
	}
	return fmt.Sprintf("event %d (logged as %s, which its digest does not prove)", b.Event, b.LoggedType)
}

func onOff(b bool) string {
	if b {
		return "enabled"
	}
	return "disabled"
}
