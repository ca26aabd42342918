package evidence_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/broker/evidence"
)

// replayed computes what a TPM would hold after extending the events.
func replayed(events []eventlogtest.Event) map[int][]byte {
	pcrs := map[int][]byte{}
	for i := 0; i < 24; i++ {
		pcrs[i] = make([]byte, 32)
	}
	for _, e := range events {
		h := sha256.New()
		h.Write(pcrs[e.PCR])
		h.Write(e.SHA256())
		pcrs[e.PCR] = h.Sum(nil)
	}
	return pcrs
}

var (
	cert   = eventlogtest.Cert("SB")
	app    = sha256.Sum256([]byte("app"))
	shim   = sha256.Sum256([]byte("shimx64.efi"))
	evil   = sha256.Sum256([]byte("bootkit.efi"))
	goodCL = "BOOT_IMAGE=/vmlinuz-6.12 root=/dev/sda1 ro ima_appraise=enforce"
	evilCL = "BOOT_IMAGE=/vmlinuz-6.12 root=/dev/sda1 ro init=/bin/sh"
)

// boot is a measured boot as UEFI firmware, shim, GRUB and systemd-stub
// log it: Secure Boot state (PCR 7), the boot manager calling the boot
// option and each application it loads (PCR 4), GRUB's commands and kernel
// command line (PCR 8), and a UKI's command line (PCR 12).
func boot(apps [][]byte, grubCmdline string, extra ...eventlogtest.Event) []eventlogtest.Event {
	evs := eventlogtest.SecureBoot(true, cert)
	evs = append(evs, eventlogtest.EFIAction(4, eventlogtest.CallingEFIApplication))
	for _, a := range apps {
		evs = append(evs, eventlogtest.BootApp(a))
	}
	evs = append(evs, eventlogtest.Separator(4),
		eventlogtest.GrubCommand("set root=hd0,gpt2"),
		eventlogtest.GrubCommand("linux /vmlinuz-6.12 "+strings.TrimPrefix(grubCmdline, "BOOT_IMAGE=/vmlinuz-6.12 ")),
		eventlogtest.KernelCmdline(grubCmdline))
	return append(evs, extra...)
}

func bootEvents() []eventlogtest.Event {
	return boot([][]byte{app[:]}, goodCL)
}

// tamper returns a copy of evs where event i is replaced by the forged
// event, keeping the digest the TPM really extended: what a node that
// rewrites its log can send.
func tamper(evs []eventlogtest.Event, i int, forged eventlogtest.Event) []eventlogtest.Event {
	out := slices.Clone(evs)
	forged.PCR, forged.Digest = evs[i].PCR, evs[i].SHA256()
	out[i] = forged
	return out
}

// index finds the event with this digest in PCR pcr.
func index(t *testing.T, evs []eventlogtest.Event, pcr int, digest []byte) int {
	for i, e := range evs {
		if e.PCR == pcr && bytes.Equal(e.SHA256(), digest) {
			return i
		}
	}
	t.Fatalf("no event with digest %x in PCR %d", digest, pcr)
	return -1
}

func TestReplayFirmwareFacts(t *testing.T) {
	evs := boot([][]byte{shim[:], app[:]}, goodCL, eventlogtest.StubCmdline("console=ttyS0 quiet"))
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	require.NotNil(t, f.SecureBoot)
	assert.True(t, *f.SecureBoot)
	assert.Equal(t, []string{"CN=SB"}, f.SecureBootAuthorities)
	require.Len(t, f.BootApps, 2, "the calling action and the separator are proven, not applications")
	assert.Equal(t, shim[:], f.BootApps[0].Digest)
	assert.Equal(t, app[:], f.BootApps[1].Digest)
	assert.Empty(t, f.BootApps[1].LoggedType)
	assert.Equal(t, []string{goodCL, "console=ttyS0 quiet"}, f.KernelCmdlines)
	assert.Equal(t, []string{"linux /vmlinuz-6.12 root=/dev/sda1 ro ima_appraise=enforce"}, f.BootloaderCommands)
	assert.Empty(t, f.KernelCmdlineUnknown)
}

// TestGrubEventsAsGrubWritesThem pins the synthesized logs to GRUB's real
// format: the data is prefix + string + NUL, the digest the string's hash.
func TestGrubEventsAsGrubWritesThem(t *testing.T) {
	e := eventlogtest.KernelCmdline("ro quiet")
	assert.Equal(t, []byte("kernel_cmdline: ro quiet\x00"), e.Data)
	d := sha256.Sum256([]byte("ro quiet"))
	assert.Equal(t, d[:], e.SHA256())
	s := eventlogtest.StubCmdline("ro")
	assert.Equal(t, []byte{'r', 0, 'o', 0, 0, 0}, s.Data)
	d = sha256.Sum256(s.Data)
	assert.Equal(t, d[:], s.SHA256(), "systemd-stub measures the UTF-16 line with its NUL")
}

// TestRetypedBootApplicationIsStillOne: the event type is not covered by
// the digest. A log that re-types the bootkit the firmware loaded, as an
// action, a separator or an unknown event, still shows it as a boot
// application (finding 1).
func TestRetypedBootApplicationIsStillOne(t *testing.T) {
	evs := boot([][]byte{app[:], evil[:]}, goodCL)
	i := index(t, evs, 4, evil[:])
	for name, forged := range map[string]eventlogtest.Event{
		"EFI action":   {Type: eventlogtest.EvEFIAction, Data: []byte("Returning from EFI Application from Boot Option")},
		"separator":    {Type: eventlogtest.EvSeparator, Data: []byte{0, 0, 0, 0}},
		"unknown type": {Type: 0x12345, Data: []byte("vendor")},
		"no action":    {Type: eventlogtest.EvNoAction, Data: []byte("x")},
	} {
		t.Run(name, func(t *testing.T) {
			f, err := evidence.ReplayFirmware(eventlogtest.Firmware(tamper(evs, i, forged)), replayed(evs))
			if forged.Type == eventlogtest.EvNoAction {
				// Not extended in a replay at all, so PCR 4 does not match.
				require.ErrorContains(t, err, "does not replay to the quoted value of PCR 4")
				return
			}
			require.NoError(t, err)
			var digests [][]byte
			for _, a := range f.BootApps {
				digests = append(digests, a.Digest)
			}
			assert.Contains(t, digests, evil[:], "the re-typed bootkit disappeared from the boot applications")
			assert.NotEmpty(t, f.BootApps[len(f.BootApps)-1].LoggedType)
		})
	}
}

// TestActionWithBinaryDataIsAnApplication: an EV_EFI_ACTION whose digest
// is the hash of its data proves the data only if it is an action string;
// an application's hashed image bytes as data would otherwise hide it.
func TestActionWithBinaryDataIsAnApplication(t *testing.T) {
	image := []byte("MZ\x90\x00\x03\x00\x00\x00PE\x00\x00")
	img := sha256.Sum256(image)
	evs := boot([][]byte{app[:], img[:]}, goodCL)
	i := index(t, evs, 4, img[:])
	forged := tamper(evs, i, eventlogtest.Event{Type: eventlogtest.EvEFIAction, Data: image})
	require.Equal(t, img[:], forged[i].SHA256())
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(forged), replayed(evs))
	require.NoError(t, err)
	require.Len(t, f.BootApps, 2)
	assert.Equal(t, img[:], f.BootApps[1].Digest)
}

// TestRewrittenKernelCmdlineIsNotEstablished: GRUB's digest covers the
// command line, not the event's type or prefix. A log whose command line
// text, type or kind was rewritten establishes no command line, or the
// real one (finding 1).
func TestRewrittenKernelCmdlineIsNotEstablished(t *testing.T) {
	evs := boot([][]byte{app[:]}, evilCL)
	real := eventlogtest.KernelCmdline(evilCL)
	i := index(t, evs, 8, real.SHA256())
	for name, tc := range map[string]struct {
		forged eventlogtest.Event
		want   []string // nil: not established
	}{
		"text rewritten":     {forged: eventlogtest.Event{Type: eventlogtest.EvIPL, Data: []byte("kernel_cmdline: " + goodCL + "\x00")}},
		"re-typed event tag": {forged: eventlogtest.Event{Type: eventlogtest.EvEventTag, Data: real.Data}},
		"re-typed unknown":   {forged: eventlogtest.Event{Type: 0x7777, Data: real.Data}},
		"UTF-16 disguise":    {forged: eventlogtest.Event{Type: eventlogtest.EvIPL, Data: eventlogtest.UTF16(goodCL + "\x00")}},
		// GRUB's kind prefix is not covered; the line is still a line.
		"relabelled command": {forged: eventlogtest.Event{Type: eventlogtest.EvIPL, Data: []byte("grub_cmd: " + evilCL + "\x00")}, want: []string{evilCL}},
	} {
		t.Run(name, func(t *testing.T) {
			f, err := evidence.ReplayFirmware(eventlogtest.Firmware(tamper(evs, i, tc.forged)), replayed(evs))
			require.NoError(t, err)
			assert.Equal(t, tc.want, f.KernelCmdlines)
			if tc.want == nil {
				assert.Contains(t, f.KernelCmdlineUnknown, "PCR 8 event")
			}
		})
	}
}

// TestRelabelledGrubStringsCannotSwapLines: a GRUB command that looks like
// a good command line, relabelled as the kernel's, does not hide the real
// line, which is relabelled as a command.
func TestRelabelledGrubStringsCannotSwapLines(t *testing.T) {
	decoy := "set kernelopts=" + goodCL
	evs := boot([][]byte{app[:]}, evilCL, eventlogtest.GrubCommand(decoy))
	i := index(t, evs, 8, eventlogtest.KernelCmdline(evilCL).SHA256())
	j := index(t, evs, 8, eventlogtest.GrubCommand(decoy).SHA256())
	forged := tamper(evs, i, eventlogtest.Event{Type: eventlogtest.EvIPL, Data: []byte("grub_cmd: " + evilCL + "\x00")})
	forged = tamper(forged, j, eventlogtest.Event{Type: eventlogtest.EvIPL, Data: []byte("kernel_cmdline: " + decoy + "\x00")})
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(forged), replayed(evs))
	require.NoError(t, err)
	assert.Contains(t, f.KernelCmdlines, evilCL)
}

// TestCmdlineFactsSurviveJSON: facts are stored as JSON, which replaces
// invalid UTF-8. A kernel-space byte (0xA0) hidden in invalid UTF-8 would
// stop splitting words after a round trip, so a GRUB string that is not
// UTF-8 establishes no command line; a valid one keeps its bytes.
func TestCmdlineFactsSurviveJSON(t *testing.T) {
	bad := "BOOT_IMAGE=/vmlinuz ro x=a\xa0init=/bin/sh"
	evs := boot([][]byte{app[:]}, bad)
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Nil(t, f.KernelCmdlines)

	nbsp := "BOOT_IMAGE=/vmlinuz ro x=a\u00a0init=/bin/sh"
	evs = boot([][]byte{app[:]}, nbsp)
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	js, err := json.Marshal(f)
	require.NoError(t, err)
	var back evidence.Facts
	require.NoError(t, json.Unmarshal(js, &back))
	assert.Equal(t, f, back)
	assert.Equal(t, "init=/bin/sh", evidence.ParseCmdline(back.KernelCmdlines[0]).Params[3].String())
}

// TestSystemdStubCmdline: systemd-stub's PCR 12 line is established when
// its digest matches; a rewritten line, or an event in PCR 12 the parser
// cannot prove (a credentials archive, an add-on), establishes none.
func TestSystemdStubCmdline(t *testing.T) {
	stub := eventlogtest.StubCmdline("root=/dev/sda1 init=/bin/sh")
	base := eventlogtest.SecureBoot(true, cert)
	base = append(base, eventlogtest.BootApp(app[:]))
	evs := append(slices.Clone(base), stub)
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Equal(t, []string{"root=/dev/sda1 init=/bin/sh"}, f.KernelCmdlines)

	// systemd's documentation says the NUL is not measured; accept that
	// form too.
	noNUL := stub
	d := sha256.Sum256(stub.Data[:len(stub.Data)-2])
	noNUL.Digest = d[:]
	evs = append(slices.Clone(base), noNUL)
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Equal(t, []string{"root=/dev/sda1 init=/bin/sh"}, f.KernelCmdlines)

	evs = append(slices.Clone(base), stub)
	forged := tamper(evs, len(evs)-1, eventlogtest.Event{Type: eventlogtest.EvIPL, Data: eventlogtest.UTF16("root=/dev/sda1\x00")})
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(forged), replayed(evs))
	require.NoError(t, err)
	assert.Nil(t, f.KernelCmdlines)
	assert.Contains(t, f.KernelCmdlineUnknown, "PCR 12 event")

	creds := eventlogtest.Event{PCR: 12, Type: eventlogtest.EvIPL, Data: eventlogtest.UTF16("Credentials initrd\x00"), Digest: app[:]}
	evs = append(slices.Clone(base), stub, creds)
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Nil(t, f.KernelCmdlines, "an unprovable PCR 12 event could be a rewritten command line")
}

// TestNoCmdlineMeasuredIsAbsent: a boot that measured no command line
// establishes none, and an unquoted fact PCR establishes nothing.
func TestNoCmdlineMeasuredIsAbsent(t *testing.T) {
	evs := append(eventlogtest.SecureBoot(true, cert), eventlogtest.BootApp(app[:]), eventlogtest.GrubCommand("set root=hd0"))
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Nil(t, f.KernelCmdlines)
	assert.Equal(t, "no kernel command line was measured into PCR 8 or 12", f.KernelCmdlineUnknown)

	pcrs := replayed(evs)
	delete(pcrs, 4)
	delete(pcrs, 7)
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(evs), pcrs)
	require.NoError(t, err)
	assert.Nil(t, f.BootApps)
	assert.Nil(t, f.SecureBoot)

	// PCRs 4 and 7 never extended: nothing about them is established.
	evs = []eventlogtest.Event{eventlogtest.KernelCmdline("ro")}
	f, err = evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	assert.Nil(t, f.BootApps)
	assert.Nil(t, f.SecureBoot)
	assert.Equal(t, []string{"ro"}, f.KernelCmdlines)
}

// TestSecureBootVariableRewrittenIsRefused: go-attestation checks that each
// PCR 7 variable event's digest is the hash of its data, so a log claiming
// Secure Boot on where the firmware measured it off is refused.
func TestSecureBootVariableRewrittenIsRefused(t *testing.T) {
	evs := append(eventlogtest.SecureBoot(false, cert), eventlogtest.BootApp(app[:]), eventlogtest.KernelCmdline(goodCL))
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	require.NotNil(t, f.SecureBoot)
	assert.False(t, *f.SecureBoot)

	on := eventlogtest.SecureBoot(true, cert)
	forged := tamper(evs, 0, on[0])
	_, err = evidence.ReplayFirmware(eventlogtest.Firmware(forged), replayed(evs))
	require.ErrorContains(t, err, `invalid digest for variable "SecureBoot"`)
}

func TestReplayFirmwareRefusesALyingLog(t *testing.T) {
	evs := bootEvents()
	pcrs := replayed(append(evs, eventlogtest.BootApp(make([]byte, 32))))
	_, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), pcrs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "does not replay to the quoted value of PCR 4")
}

func TestReplayIMAPrefix(t *testing.T) {
	files := []eventlogtest.IMAFile{{Path: "/bin/a", Digest: app[:]}, {Path: "/bin/b", Digest: app[:]}}
	log, evs := eventlogtest.IMA(files)
	// Quoted after the first measurement; the second came later.
	ima, err := evidence.ReplayIMA(log, replayed(evs[:1])[10])
	require.NoError(t, err)
	require.Len(t, ima.Entries, 1)
	assert.Equal(t, "/bin/a", ima.Entries[0].Path)
	ima, err = evidence.ReplayIMA(log, make([]byte, 32))
	require.NoError(t, err, "a quote before any measurement covers the empty prefix")
	assert.Nil(t, ima.Entries)
	_, err = evidence.ReplayIMA(log, app[:])
	assert.ErrorContains(t, err, "does not replay")
}

// TestIMAViolationIsCountedNotListed: a violation's template data is not
// what the kernel extended (it extends all ones), so its path and digest
// prove nothing: relabelled as an allowed file, it is still only counted
// (finding 2).
func TestIMAViolationIsCountedNotListed(t *testing.T) {
	files := []eventlogtest.IMAFile{
		{Path: "/bin/a", Digest: app[:]},
		{Path: "/usr/bin/allowed", Digest: app[:], Violation: true},
		{Path: "/bin/b", Digest: app[:]},
	}
	log, evs := eventlogtest.IMA(files)
	ima, err := evidence.ReplayIMA(log, replayed(evs)[10])
	require.NoError(t, err)
	require.Len(t, ima.Entries, 2)
	assert.Equal(t, "/bin/a", ima.Entries[0].Path)
	assert.Equal(t, "/bin/b", ima.Entries[1].Path)
	assert.Equal(t, 1, ima.Violations)

	// Counted only in the quoted prefix.
	ima, err = evidence.ReplayIMA(log, replayed(evs[:1])[10])
	require.NoError(t, err)
	assert.Equal(t, 0, ima.Violations)

	// A log of violations only still shows IMA ran: an empty list, not
	// an absent one.
	log, evs = eventlogtest.IMA(files[1:2])
	ima, err = evidence.ReplayIMA(log, replayed(evs)[10])
	require.NoError(t, err)
	assert.NotNil(t, ima.Entries)
	assert.Empty(t, ima.Entries)
	assert.Equal(t, 1, ima.Violations)

	// Claiming an ordinary entry is a violation does not replay.
	log, evs = eventlogtest.IMA(files[:1])
	forged, _ := eventlogtest.IMA([]eventlogtest.IMAFile{{Path: "/bin/a", Digest: app[:], Violation: true}})
	_, err = evidence.ReplayIMA(forged, replayed(evs)[10])
	require.ErrorContains(t, err, "does not replay")
	_ = log
}

func FuzzReplayFirmware(f *testing.F) {
	evs := boot([][]byte{shim[:], app[:]}, goodCL, eventlogtest.StubCmdline("quiet"))
	pcrs := replayed(evs)
	f.Add(eventlogtest.Firmware(evs))
	f.Add(eventlogtest.Firmware(nil))
	f.Add([]byte{0, 0, 0, 0, 3, 0, 0, 0})
	// Tampered logs: a re-typed application, a rewritten command line.
	i := index(&testing.T{}, evs, 4, app[:])
	f.Add(eventlogtest.Firmware(tamper(evs, i, eventlogtest.Event{Type: eventlogtest.EvEFIAction, Data: []byte("x")})))
	j := index(&testing.T{}, evs, 8, eventlogtest.KernelCmdline(goodCL).SHA256())
	f.Add(eventlogtest.Firmware(tamper(evs, j, eventlogtest.Event{Type: eventlogtest.EvIPL, Data: []byte("kernel_cmdline: ro\x00")})))
	f.Fuzz(func(t *testing.T, log []byte) {
		// Hostile logs end in an error, never a panic. Whatever is accepted
		// replays to the PCRs it was checked against, so every application
		// the honest log shows is still there, and a command line is
		// either established, with the real ones among the lines, or said
		// not to be.
		fa, err := evidence.ReplayFirmware(log, pcrs)
		if err != nil {
			return
		}
		require.True(t, fa.FirmwareLog)
		var digests [][]byte
		for _, a := range fa.BootApps {
			digests = append(digests, a.Digest)
		}
		require.Contains(t, digests, shim[:])
		require.Contains(t, digests, app[:])
		require.Equal(t, fa.KernelCmdlines == nil, fa.KernelCmdlineUnknown != "")
		if fa.KernelCmdlines != nil {
			require.Subset(t, fa.KernelCmdlines, []string{goodCL, "quiet"})
		}
	})
}

func FuzzReplayIMA(f *testing.F) {
	log, evs := eventlogtest.IMA([]eventlogtest.IMAFile{{Path: "/bin/a", Digest: app[:]}, {Path: "/bin/v", Digest: app[:], Violation: true}})
	f.Add(log)
	f.Add([]byte{10, 0, 0, 0})
	pcr10 := replayed(evs)[10]
	f.Fuzz(func(t *testing.T, log []byte) {
		// Whatever replays to these PCRs is the measurement and the
		// violation that made them.
		ima, err := evidence.ReplayIMA(log, pcr10)
		if err != nil {
			return
		}
		require.Len(t, ima.Entries, 1)
		require.Equal(t, "/bin/a", ima.Entries[0].Path)
		require.Equal(t, 1, ima.Violations)
	})
}

func FuzzVerifyTagCertification(f *testing.F) {
	// The fuzzed certification is signed by the test AK, so the parsing and
	// checks behind the signature run on hostile input; only a structure
	// with the magic, the tag index's attributes and a 32-byte digest may
	// pass.
	t := &testing.T{}
	ak := newSigner(t)
	qd := make([]byte, 32)
	info, nvPub := certification(t, tpm2.TPMGeneratedValue, qd, make([]byte, 32))
	f.Add(info, nvPub)
	f.Add(info[:len(info)-3], nvPub)
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, info, nvPublic []byte) {
		digest, err := evidence.VerifyTagCertification(ak.public, info, ak.sign(t, info), nvPublic, qd)
		if err == nil {
			require.Len(t, digest, 32)
			att, err := tpm2.Unmarshal[tpm2.TPMSAttest](info)
			require.NoError(t, err)
			require.NoError(t, att.Magic.Check())
		}
		// A certification by any other key never verifies.
		_, err = evidence.VerifyTagCertification(newSigner(t).public, info, ak.sign(t, info), nvPublic, qd)
		require.Error(t, err)
	})
}
