package attest

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

// TestSwtpmSilenceIsNamed: a TPM that takes a command and never answers
// fails the command at the deadline, saying the TPM did not answer, not
// with a socket error.
func TestSwtpmSilenceIsNamed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold it open, answer nothing
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	c, err := DialSwtpm(ctx, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	_, err = c.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0}) // TPM2_Startup
	if err == nil {
		t.Fatal("a silent TPM answered")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("gave up after %s, past the deadline", d)
	}
	want := "the TPM (swtpm at " + l.Addr().String() + ") did not answer before the request's deadline"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
}

// TestSwtpmDeadlineBoundsEveryCommand: the context's deadline bounds all
// the commands on a connection together, not each: a caller that goes on
// sending commands to a TPM that stopped answering (go-attestation's open
// does) fails at the deadline, not a deadline per command later.
func TestSwtpmDeadlineBoundsEveryCommand(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	const deadline = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	c, err := DialSwtpm(ctx, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	for range 3 {
		if _, err := c.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0}); err == nil {
			t.Fatal("a silent TPM answered")
		}
	}
	if d := time.Since(start); d > deadline+200*time.Millisecond {
		t.Errorf("three commands to a silent TPM took %s; the deadline was %s", d, deadline)
	}
}

// silentTPM listens like swtpm and never answers a command.
func silentTPM(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	return "swtpm://" + l.Addr().String()
}

// TestLayersShareTheSilentTPMsFailure: the layers of one pull (callers of
// one Sessions, sharing a deadline) that waited while the TPM left the
// holder's command unanswered all report that, within the deadline: not
// that they waited for an attestation, nor a dial they had no time left
// for.
func TestLayersShareTheSilentTPMsFailure(t *testing.T) {
	uri := silentTPM(t)
	m := &Sessions{State: &State{Name: "node1", Broker: "b"},
		TPM: func(ctx context.Context) (*TPM, error) { return OpenTPM(ctx, uri) }}
	const deadline = 400 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			_, err := m.Get(ctx)
			errs <- err
		}()
	}
	for range 4 {
		err := <-errs
		if err == nil || !strings.Contains(err.Error(), "did not answer before the request's deadline") {
			t.Errorf("a layer failed with %v, not the TPM's silence", err)
		}
	}
	if d := time.Since(start); d > deadline+lockGrace+500*time.Millisecond {
		t.Errorf("the layers failed after %s; the deadline was %s", d, deadline)
	}
}
