package evidence_test

import (
	"crypto/sha256"
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
	cert = eventlogtest.Cert("SB")
	app  = sha256.Sum256([]byte("app"))
)

func bootEvents() []eventlogtest.Event {
	return append(eventlogtest.SecureBoot(true, cert), eventlogtest.BootApp(app[:]), eventlogtest.KernelCmdline("ro quiet"))
}

func TestReplayFirmwareFacts(t *testing.T) {
	evs := bootEvents()
	f, err := evidence.ReplayFirmware(eventlogtest.Firmware(evs), replayed(evs))
	require.NoError(t, err)
	require.NotNil(t, f.SecureBoot)
	assert.True(t, *f.SecureBoot)
	assert.Equal(t, []string{"CN=SB"}, f.SecureBootAuthorities)
	require.Len(t, f.BootApps, 1)
	assert.Equal(t, app[:], f.BootApps[0].Digest)
	assert.Equal(t, []string{"ro quiet"}, f.KernelCmdlines)
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
	entries, err := evidence.ReplayIMA(log, replayed(evs[:1])[10])
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.Equal(t, "/bin/a", entries[0].Path)
	_, err = evidence.ReplayIMA(log, make([]byte, 32))
	require.NoError(t, err, "a quote before any measurement covers the empty prefix")
	_, err = evidence.ReplayIMA(log, app[:])
	assert.ErrorContains(t, err, "does not replay")
}

func FuzzReplayFirmware(f *testing.F) {
	evs := bootEvents()
	f.Add(eventlogtest.Firmware(evs))
	f.Add(eventlogtest.Firmware(nil))
	f.Add([]byte{0, 0, 0, 0, 3, 0, 0, 0})
	pcrs := replayed(evs)
	f.Fuzz(func(t *testing.T, log []byte) {
		// Hostile logs end in an error, never a panic; whatever is
		// accepted replays to the PCRs it was checked against.
		if fa, err := evidence.ReplayFirmware(log, pcrs); err == nil {
			require.True(t, fa.FirmwareLog)
		}
	})
}

func FuzzReplayIMA(f *testing.F) {
	log, evs := eventlogtest.IMA([]eventlogtest.IMAFile{{Path: "/bin/a", Digest: app[:]}})
	f.Add(log)
	f.Add([]byte{10, 0, 0, 0})
	pcr10 := replayed(evs)[10]
	f.Fuzz(func(t *testing.T, log []byte) {
		_, _ = evidence.ReplayIMA(log, pcr10)
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
