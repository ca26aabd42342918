package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker"
	"github.com/attested-dev/attested/broker/brokertest"
)

// cli runs the attested command with an admin configuration for b.
func cli(t *testing.T, b *brokertest.Broker, args ...string) (string, error) {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "admin.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("broker: "+b.Addr+"\nbrokerCA: "+filepath.Join(b.DataDir, broker.CACertFile)+
		"\nadminTokenFile: "+filepath.Join(b.DataDir, broker.AdminTokenFile)+"\n"), 0o600))
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"--config", cfg}, args...))
	err := root.Execute()
	return out.String(), err
}

var secretRe = regexp.MustCompile(`whsec_[A-Za-z0-9_-]{43}`)

func TestWebhookCommands(t *testing.T) {
	rc := brokertest.NewReceiver(t)
	b := brokertest.Start(t, func(c *broker.Config) { c.Webhooks.CAFile = rc.CAFile })

	out, err := cli(t, b, "webhook", "add", rc.URL, "--events", "status,refusal")
	require.NoError(t, err, out)
	assert.Regexp(t, `webhook wh_[0-9a-f]{16} added: https://127\.0\.0\.1:\d+/hook \(events refusal,status\)`, out)
	secret := secretRe.FindString(out)
	require.NotEmpty(t, secret, "add prints the secret: %s", out)
	id := regexp.MustCompile(`wh_[0-9a-f]{16}`).FindString(out)

	out, err = cli(t, b, "webhook", "test", id)
	require.NoError(t, err, out)
	assert.Contains(t, out, "receiver answered 204 No Content to event evt_")
	evs := rc.Events(t, secret)
	require.Len(t, evs, 1, "the test event verifies with the printed secret")
	assert.Equal(t, "test", evs[0].Kind)

	out, err = cli(t, b, "webhook", "list")
	require.NoError(t, err, out)
	assert.Contains(t, out, "ID")
	assert.Contains(t, out, "FAILED")
	assert.Contains(t, out, id)
	assert.NotContains(t, out, secret, "the secret is shown once")
	assert.NotContains(t, out, "whsec_")

	file := filepath.Join(t.TempDir(), "hook.secret")
	out, err = cli(t, b, "webhook", "add", rc.URL, "--secret-file", file)
	require.NoError(t, err, out)
	assert.NotContains(t, out, "whsec_", "written to the file, not printed")
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.Regexp(t, `^whsec_\S{43}\n$`, string(data))
	fi, err := os.Stat(file)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	_, err = cli(t, b, "webhook", "add", rc.URL, "--secret-file", file)
	assert.ErrorContains(t, err, "exists; name a new file")

	_, err = cli(t, b, "webhook", "add", "http://127.0.0.1:9/hook", "--events", "status")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "is plain http")
	assert.Contains(t, err.Error(), "--insecure-http")
	out, err = cli(t, b, "webhook", "add", "http://127.0.0.1:9/hook", "--events", "status", "--insecure-http")
	require.NoError(t, err, out)
	_, err = cli(t, b, "webhook", "add", "ftp://127.0.0.1:9/hook", "--insecure-http")
	assert.ErrorContains(t, err, `scheme "ftp" is not https`)
	_, err = cli(t, b, "webhook", "add", rc.URL, "--events", "stauts")
	assert.ErrorContains(t, err, `unknown webhook event "stauts"`)

	out, err = cli(t, b, "webhook", "remove", id)
	require.NoError(t, err, out)
	assert.Contains(t, out, "webhook "+id+" removed")
	_, err = cli(t, b, "webhook", "test", id)
	assert.ErrorContains(t, err, "not found")

	// A receiver that refuses: test exits non-zero and says why.
	rc.SetAnswer(func(int) int { return 401 })
	out, err = cli(t, b, "webhook", "list")
	require.NoError(t, err)
	other := regexp.MustCompile(`wh_[0-9a-f]{16}`).FindString(out)
	_, err = cli(t, b, "webhook", "test", other)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "test event not delivered: receiver answered 401 Unauthorized")

	ws, err := b.Admin.ListWebhooks(context.Background(), nil)
	require.NoError(t, err)
	for _, w := range ws.GetWebhooks() {
		assert.False(t, strings.Contains(w.String(), "whsec_"), "no secret over the API after add")
	}
}
