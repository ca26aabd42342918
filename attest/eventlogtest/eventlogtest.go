// Package eventlogtest synthesizes TCG firmware event logs and IMA logs for
// tests, and extends their digests into a TPM, so that the broker's replay
// runs against real quoted PCR values.
package eventlogtest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"io"
	"math/big"
	"time"
	"unicode/utf16"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// TCG event types.
const (
	EvNoAction              = 0x00000003
	EvSeparator             = 0x00000004
	EvEventTag              = 0x00000006
	EvIPL                   = 0x0000000D
	EvEFIVariableDriverConf = 0x80000001
	EvEFIBootServicesApp    = 0x80000003
	EvEFIAction             = 0x80000007
	EvEFIVariableAuthority  = 0x800000E0
)

// Event is one measured event. Digest defaults to SHA-256 of Data, which is
// what firmware extends for the events whose data is the measured content
// (separators, EFI actions, UEFI variables); for the others (boot
// applications, GRUB's strings) the constructors below set it as the real
// measuring component does.
type Event struct {
	PCR    int
	Type   uint32
	Data   []byte
	Digest []byte
}

// SHA256 is the digest extended into the PCR.
func (e Event) SHA256() []byte {
	if e.Digest != nil {
		return e.Digest
	}
	s := sha256.Sum256(e.Data)
	return s[:]
}

func le(w *bytes.Buffer, v any) { binary.Write(w, binary.LittleEndian, v) }

// Firmware encodes events as a crypto-agile (TCG2) log with a SHA-256 bank.
func Firmware(events []Event) []byte {
	var w bytes.Buffer
	// Spec ID event, in the legacy TCG_PCR_EVENT format.
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	le(&spec, uint32(0))           // platform class
	spec.Write([]byte{0, 2, 0, 2}) // spec version minor, major, errata, uintn size
	le(&spec, uint32(1))           // number of algorithms
	le(&spec, uint16(0x000B))      // TPM_ALG_SHA256
	le(&spec, uint16(32))
	spec.WriteByte(0) // vendor info size
	le(&w, uint32(0))
	le(&w, uint32(EvNoAction))
	w.Write(make([]byte, 20))
	le(&w, uint32(spec.Len()))
	w.Write(spec.Bytes())
	for _, e := range events {
		le(&w, uint32(e.PCR))
		le(&w, e.Type)
		le(&w, uint32(1))
		le(&w, uint16(0x000B))
		w.Write(e.SHA256())
		le(&w, uint32(len(e.Data)))
		w.Write(e.Data)
	}
	return w.Bytes()
}

// Extend extends every event's digest into the TPM's SHA-256 PCRs.
func Extend(rw io.ReadWriter, events []Event) error {
	for _, e := range events {
		if err := legacy.PCRExtend(rw, tpmutil.Handle(e.PCR), legacy.AlgSHA256, e.SHA256(), ""); err != nil {
			return err
		}
	}
	return nil
}

type guid struct {
	D1     uint32
	D2, D3 uint16
	D4     [8]byte
}

var (
	globalVariable  = guid{0x8BE4DF61, 0x93CA, 0x11d2, [8]byte{0xAA, 0x0D, 0x00, 0xE0, 0x98, 0x03, 0x2B, 0x8C}}
	imageSecurityDB = guid{0xd719b2cb, 0x3d3a, 0x4596, [8]byte{0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f}}
	certX509        = guid{0xa5c059a1, 0x94e4, 0x4aa7, [8]byte{0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72}}
	owner           = guid{0x77fa9abd, 0x0359, 0x4d32, [8]byte{0xbd, 0x60, 0x28, 0xf4, 0xe7, 0x8f, 0x78, 0x4b}}
)

func uefiVariable(g guid, name string, data []byte) []byte {
	var w bytes.Buffer
	u := utf16.Encode([]rune(name))
	le(&w, g)
	le(&w, uint64(len(u)))
	le(&w, uint64(len(data)))
	le(&w, u)
	w.Write(data)
	return w.Bytes()
}

func signatureList(cert []byte) []byte {
	var w bytes.Buffer
	le(&w, certX509)
	le(&w, uint32(28+16+len(cert)))
	le(&w, uint32(0))
	le(&w, uint32(16+len(cert)))
	le(&w, owner)
	w.Write(cert)
	return w.Bytes()
}

func signatureData(cert []byte) []byte {
	var w bytes.Buffer
	le(&w, owner)
	w.Write(cert)
	return w.Bytes()
}

// Cert returns a self-signed certificate standing for a Secure Boot key.
func Cert(cn string) []byte {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	return der
}

// SecureBoot returns PCR 7 events for a platform with Secure Boot on or
// off, whose db holds cert, and an authority event saying cert verified a
// boot component.
func SecureBoot(enabled bool, cert []byte) []Event {
	sb := byte(0)
	if enabled {
		sb = 1
	}
	evs := []Event{
		{PCR: 7, Type: EvEFIVariableDriverConf, Data: uefiVariable(globalVariable, "SecureBoot", []byte{sb})},
		{PCR: 7, Type: EvEFIVariableDriverConf, Data: uefiVariable(globalVariable, "PK", signatureList(cert))},
		{PCR: 7, Type: EvEFIVariableDriverConf, Data: uefiVariable(globalVariable, "KEK", signatureList(cert))},
		{PCR: 7, Type: EvEFIVariableDriverConf, Data: uefiVariable(imageSecurityDB, "db", signatureList(cert))},
		{PCR: 7, Type: EvSeparator, Data: []byte{0, 0, 0, 0}},
	}
	if enabled {
		evs = append(evs, Event{PCR: 7, Type: EvEFIVariableAuthority, Data: uefiVariable(imageSecurityDB, "db", signatureData(cert))})
	}
	return evs
}

// BootApp is an EFI application load (PCR 4) whose Authenticode digest is
// digest. Its data (UEFI_IMAGE_LOAD_EVENT: where the image was loaded and
// its device path) is not what the digest covers.
func BootApp(digest []byte) Event {
	return Event{PCR: 4, Type: EvEFIBootServicesApp, Data: make([]byte, 32), Digest: digest}
}

// EFIAction is an EV_EFI_ACTION event: the digest is SHA-256 of the action
// string, as in "Calling EFI Application from Boot Option" (PCR 4).
func EFIAction(pcr int, action string) Event {
	return Event{PCR: pcr, Type: EvEFIAction, Data: []byte(action)}
}

// CallingEFIApplication is the action firmware measures into PCR 4 before
// it starts the boot option.
const CallingEFIApplication = "Calling EFI Application from Boot Option"

// Separator is the EV_SEPARATOR firmware measures into a PCR at the end of
// pre-OS measurements.
func Separator(pcr int) Event {
	return Event{PCR: pcr, Type: EvSeparator, Data: []byte{0, 0, 0, 0}}
}

// grubString is a string GRUB measures into PCR 8 (grub-core/commands/tpm.c,
// grub_tpm_verify_string): the event data is the prefix, the string and a
// NUL, but the digest is SHA-256 of the string alone, without prefix or NUL.
// So the prefix, which says what kind of string it is, is not covered.
func grubString(prefix, s string) Event {
	d := sha256.Sum256([]byte(s))
	return Event{PCR: 8, Type: EvIPL, Data: []byte(prefix + s + "\x00"), Digest: d[:]}
}

// KernelCmdline is GRUB's measurement of the kernel command line it hands
// to the kernel (PCR 8).
func KernelCmdline(cmdline string) Event { return grubString("kernel_cmdline: ", cmdline) }

// GrubCommand is GRUB's measurement of a command it runs (PCR 8).
func GrubCommand(cmd string) Event { return grubString("grub_cmd: ", cmd) }

// StubCmdline is systemd-stub's measurement of the kernel command line
// (PCR 12, EV_IPL). systemd's src/boot/measure.c (tpm_log_load_options)
// measures the UTF-16LE line including its NUL terminator (strsize16) and
// logs the same bytes as the event data.
func StubCmdline(cmdline string) Event {
	return Event{PCR: 12, Type: EvIPL, Data: UTF16(cmdline + "\x00")}
}

// UTF16 encodes s as UTF-16LE, as UEFI strings are.
func UTF16(s string) []byte {
	var w bytes.Buffer
	le(&w, utf16.Encode([]rune(s)))
	return w.Bytes()
}

// IMAFile is one file IMA measured.
type IMAFile struct {
	Path   string
	Digest []byte // SHA-256 of the file content
	// Violation records a measurement violation (a file opened for write
	// while measured, or measured while open for write): the kernel logs a
	// zero template hash and extends all ones, whatever the template data
	// says.
	Violation bool
}

// IMA encodes files as an ima-ng binary runtime measurement list and
// returns the digests to extend into PCR 10 (SHA-256 of each entry's
// template data; all ones for a violation).
func IMA(files []IMAFile) ([]byte, []Event) {
	var w bytes.Buffer
	var evs []Event
	for _, f := range files {
		var data bytes.Buffer
		field := append([]byte("sha256:\x00"), f.Digest...)
		le(&data, uint32(len(field)))
		data.Write(field)
		path := []byte(f.Path + "\x00")
		le(&data, uint32(len(path)))
		data.Write(path)
		sha1sum := sha1.Sum(data.Bytes())
		ev := Event{PCR: 10, Data: data.Bytes()}
		if f.Violation {
			sha1sum = [sha1.Size]byte{}
			ev.Digest = bytes.Repeat([]byte{0xff}, sha256.Size)
		}
		le(&w, uint32(10))
		w.Write(sha1sum[:])
		le(&w, uint32(len("ima-ng")))
		w.WriteString("ima-ng")
		le(&w, uint32(data.Len()))
		w.Write(data.Bytes())
		evs = append(evs, ev)
	}
	return w.Bytes(), evs
}
