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
	want := "the TPM (swtpm at " + l.Addr().String() + ") did not answer within"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
}
