package broker_test

import (
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/broker/brokertest"
)

// forge keeps the digest the TPM really extended for e but gives the log
// another type and data, as a node that rewrites its log would.
func forge(e eventlogtest.Event, typ uint32, data string) eventlogtest.Event {
	return eventlogtest.Event{PCR: e.PCR, Type: typ, Data: []byte(data), Digest: e.SHA256()}
}

// TestTamperedFirmwareLogIsRefused: with the quoted PCRs of a boot that
// loaded a bootkit with init=/bin/sh, a log that re-types the bootkit and
// rewrites the command line replays, but establishes neither an allowed
// application list nor a command line, so the key is refused (finding 1).
func TestTamperedFirmwareLogIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.firmware = bt.firmware[:len(bt.firmware)-1] // the command line comes below
	app := eventlogtest.BootApp(rootkit[:])
	line := eventlogtest.KernelCmdline("root=/dev/sda1 ro ima_appraise=enforce init=/bin/sh")
	bt.extendOnly = []eventlogtest.Event{app, line}
	bt.logOnly = []eventlogtest.Event{
		forge(app, eventlogtest.EvEFIAction, "Returning from EFI Application from Boot Option"),
		forge(line, eventlogtest.EvIPL, "kernel_cmdline: root=/dev/sda1 ro ima_appraise=enforce\x00"),
	}
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err, "a tampered log released the key")
	assert.Contains(t, err.Error(), "(logged as EV_EFI_ACTION, which its digest does not prove) digest "+hex.EncodeToString(rootkit[:])[:16]+".. is not an allowed boot application of policy prod-eu")
	assert.Contains(t, err.Error(), "no measured kernel command line was established: PCR 8 event")
}

// TestIMAViolationRelabelledIsRefused: a violation whose template data
// names an allowed file and digest proves nothing (finding 2).
func TestIMAViolationRelabelledIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.ima = append(bt.ima, eventlogtest.IMAFile{Path: "/usr/bin/bash", Digest: bash[:], Violation: true})
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err, "an IMA violation passed the allow-list")
	assert.Contains(t, err.Error(), "IMA recorded 1 measurement violation(s)")
}

// TestKernelCmdlineSubstringTrickIsRefused: ima_appraise=enforce inside
// another parameter's value, with the real one set to fix (finding 12).
func TestKernelCmdlineSubstringTrickIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.firmware[len(bt.firmware)-1] = eventlogtest.KernelCmdline("root=/dev/sda1 x=ima_appraise=enforce ima_appraise=fix")
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err, "a substring satisfied the required parameter")
	assert.Contains(t, err.Error(), `sets "ima_appraise=fix", but policy prod-eu requires "ima_appraise=enforce"`)
}
