//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/eventlogtest"
)

// measure extends events into the node's swtpm, as firmware, GRUB and the
// kernel would, writes the logs the node sends (which may lie about them),
// and points the node's configuration at them.
func (n *node) measure(extended []eventlogtest.Event, firmwareLog, imaLog []byte) {
	w := n.w
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := attest.DialSwtpm(ctx, n.tpm.Addr())
	require.NoError(w.t, err)
	defer c.Close()
	require.NoError(w.t, eventlogtest.Extend(c, extended))
	fw := filepath.Join(n.dir, "binary_bios_measurements")
	ima := filepath.Join(n.dir, "binary_runtime_measurements")
	require.NoError(w.t, os.WriteFile(fw, firmwareLog, 0o600))
	require.NoError(w.t, os.WriteFile(ima, imaLog, 0o600))
	cfg, err := os.ReadFile(n.cfg)
	require.NoError(w.t, err)
	if !bytes.Contains(cfg, []byte("\neventLog: ")) {
		cfg = fmt.Appendf(cfg, "eventLog: %s\nimaLog: %s\n", fw, ima)
		require.NoError(w.t, os.WriteFile(n.cfg, cfg, 0o600))
	}
}

var (
	e2eShim    = sha256.Sum256([]byte("shimx64.efi"))
	e2eGrub    = sha256.Sum256([]byte("grubx64.efi"))
	e2eBootkit = sha256.Sum256([]byte("bootkit.efi"))
	e2eBash    = sha256.Sum256([]byte("/usr/bin/bash"))
)

// measuredPolicy replaces the world's policy prod (of key app) with a
// measured-boot one.
func (w *world) measuredPolicy() {
	w.t.Helper()
	doc := fmt.Sprintf(`name: prod
secureBoot: required
bootApplications: ["%s", "%s"]
kernelCmdline:
  require: ["ima_appraise=enforce"]
  forbid: ["init=/bin/sh"]
ima:
  allow:
    /usr/bin/bash: ["%s"]
`, hex.EncodeToString(e2eShim[:]), hex.EncodeToString(e2eGrub[:]), hex.EncodeToString(e2eBash[:]))
	f := filepath.Join(w.dir, "policy-measured.yaml")
	require.NoError(w.t, os.WriteFile(f, []byte(doc), 0o600))
	require.Contains(w.t, w.admin("policy", "apply", "-f", f), "policy prod applied")
}

// TestTamperedEvidenceRefused: the review's attacks on the evidence,
// against the built binary and swtpm. The TPM holds a boot that loaded a
// bootkit with init=/bin/sh and an IMA violation; the node's logs re-type
// the bootkit, rewrite the command line and relabel the violation as an
// allowed file (findings 1 and 2). After a reboot, a command line that
// satisfies the policy only as substrings (finding 12). Each pull is
// refused, with the reasons named.
func TestTamperedEvidenceRefused(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	w.measuredPolicy()

	cert := eventlogtest.Cert("Test Secure Boot CA")
	boot := append(eventlogtest.SecureBoot(true, cert),
		eventlogtest.EFIAction(4, eventlogtest.CallingEFIApplication),
		eventlogtest.BootApp(e2eShim[:]), eventlogtest.BootApp(e2eGrub[:]))
	bootkit := eventlogtest.BootApp(e2eBootkit[:])
	line := eventlogtest.KernelCmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro ima_appraise=enforce init=/bin/sh")
	extended := append(append([]eventlogtest.Event{}, boot...), bootkit, eventlogtest.Separator(4), line)
	logged := append(append([]eventlogtest.Event{}, boot...),
		eventlogtest.Event{PCR: 4, Type: eventlogtest.EvEFIAction, Data: []byte("Returning from EFI Application from Boot Option"), Digest: bootkit.SHA256()},
		eventlogtest.Separator(4),
		eventlogtest.Event{PCR: 8, Type: eventlogtest.EvIPL, Data: []byte("kernel_cmdline: BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro ima_appraise=enforce\x00"), Digest: line.SHA256()})
	imaLog, imaEvents := eventlogtest.IMA([]eventlogtest.IMAFile{
		{Path: "/usr/bin/bash", Digest: e2eBash[:]},
		{Path: "/usr/bin/bash", Digest: e2eBash[:], Violation: true},
	})
	n.measure(append(extended, imaEvents...), eventlogtest.Firmware(logged), imaLog)

	// The honest parts of the evidence pass: the refusals below are the
	// tampering's.
	r := w.attested(n, "node", "attest", "--explain")
	require.Error(t, r.err, "a node that would be refused a key exits non-zero")
	assert.Contains(t, r.msg(), "would be refused key app")
	assert.Regexp(t, `ok +secureBoot `, string(r.stdout))
	assert.Regexp(t, `FAIL +bootApplications `, string(r.stdout))

	msg, _ := w.refusedPull(n, execMode)
	assert.Contains(t, msg, "(logged as EV_EFI_ACTION, which its digest does not prove) digest "+hex.EncodeToString(e2eBootkit[:])[:16])
	assert.Contains(t, msg, "no measured kernel command line was established: PCR 8 event")
	assert.Contains(t, msg, "IMA recorded 1 measurement violation(s)")

	// Reboot into a boot the logs tell truthfully, whose command line has
	// ima_appraise=enforce only inside another parameter's value.
	n.tpm.Reboot()
	boot = append(boot, eventlogtest.Separator(4),
		eventlogtest.KernelCmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda1 x=ima_appraise=enforce ima_appraise=fix init=/bin//sh"))
	imaLog, imaEvents = eventlogtest.IMA([]eventlogtest.IMAFile{{Path: "/usr/bin/bash", Digest: e2eBash[:]}})
	n.measure(append(boot, imaEvents...), eventlogtest.Firmware(boot), imaLog)
	msg, _ = w.refusedPull(n, execMode)
	assert.Contains(t, msg, `sets "ima_appraise=fix", but policy prod requires "ima_appraise=enforce"`)
	assert.NotContains(t, msg, "is not an allowed boot application")
}
