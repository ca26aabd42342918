// Package attest is the node side of attested: it opens the node's TPM,
// enrolls its EK and attestation key with the broker, produces quotes bound
// to a broker nonce and a session key, and keeps the resulting session.
package attest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// DefaultTPMTimeout bounds one TPM command. Key creation on a slow TPM takes
// seconds; nothing legitimate takes longer than this.
const DefaultTPMTimeout = 30 * time.Second

// TPM is an open TPM: its command channel and go-attestation's view of it.
type TPM struct {
	ch  channel
	dev *attest.TPM
	// session is the session key last loaded, kept until Close so that
	// the layers of one pull on a lingering TPM load it once. Loading
	// grants nothing: each use still needs its PCR policy.
	session *loaded
}

// channel is a TPM command channel (go-attestation's CommandChannelTPM20).
type channel interface {
	io.ReadWriteCloser
	MeasurementLog() ([]byte, error)
}

// OpenTPM opens the TPM named by spec:
//
//	/dev/tpmrm0 (any device path)   the kernel resource manager
//	swtpm://127.0.0.1:2321          swtpm's TCP data channel
//	simulator                       the in-process go-tpm-tools simulator
//
// ctx bounds the connection and, for swtpm, every command.
func OpenTPM(ctx context.Context, spec string) (*TPM, error) {
	var ch channel
	var err error
	switch {
	case spec == "":
		return nil, errors.New("attest: no TPM configured (--tpm /dev/tpmrm0 | swtpm://HOST:PORT | simulator)")
	case spec == "simulator":
		if openSimulator == nil {
			return nil, errors.New("attest: this build has no TPM simulator (build with -tags simulator)")
		}
		var rwc io.ReadWriteCloser
		if rwc, err = openSimulator(); err == nil {
			ch = simChannel{rwc}
		}
	case strings.HasPrefix(spec, "swtpm://"):
		var c *swtpmConn
		if c, err = dialSwtpm(ctx, strings.TrimPrefix(spec, "swtpm://")); err == nil {
			ch = c
		}
	case strings.HasPrefix(spec, "/"):
		ch, err = openDevice(ctx, spec)
	default:
		return nil, fmt.Errorf("attest: TPM %q: want a device path, swtpm://HOST:PORT or simulator", spec)
	}
	if err != nil {
		return nil, err
	}
	dev, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: ch})
	if err != nil {
		ch.Close()
		return nil, openError(ch, fmt.Errorf("attest: open TPM %s: %w", spec, err))
	}
	t := &TPM{ch: ch, dev: dev}
	if _, ok := ch.(*swtpmConn); ok {
		if err := t.flushLeftovers(); err != nil {
			t.Close()
			return nil, openError(ch, fmt.Errorf("attest: open TPM %s: %w", spec, err))
		}
	}
	return t, nil
}

// silentError is an error of a TPM that left a command unanswered until
// the deadline.
type silentError struct{ error }

func (e silentError) Unwrap() error { return e.error }

// openError marks err silent when the TPM was.
func openError(ch channel, err error) error {
	if (&TPM{ch: ch}).Silent() {
		return silentError{err}
	}
	return err
}

// isSilent reports whether err came from a TPM that stopped answering.
func isSilent(err error) bool {
	var s silentError
	return errors.As(err, &s)
}

// flushLeftovers flushes every transient object and session in a TPM that
// has no resource manager (swtpm): it serves one connection at a time and
// every user of ours flushes what it loaded before letting go, so whatever
// is loaded when a connection begins was left by a process that died
// (a killed agent's session key), and would fill the TPM's few slots. The
// kernel's resource manager (/dev/tpmrm0) does this itself.
func (t *TPM) flushLeftovers() error {
	tp := transport.FromReadWriter(t.ch)
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession} {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(tp)
		if err != nil {
			return fmt.Errorf("list loaded handles: %w", err)
		}
		handles, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return fmt.Errorf("list loaded handles: %w", err)
		}
		for _, h := range handles.Handle {
			if uint32(h)>>24 != uint32(ht) {
				break
			}
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tp); err != nil {
				return fmt.Errorf("flush handle %#x left by an earlier user: %w", uint32(h), err)
			}
		}
	}
	return nil
}

// Close releases the TPM connection, flushing the session key it kept.
func (t *TPM) Close() error {
	t.flushSessionKey()
	return t.dev.Close()
}

// Silent reports whether a command went unanswered until its deadline
// (errors from the TPM libraries do not always wrap ours).
func (t *TPM) Silent() bool {
	switch c := t.ch.(type) {
	case *swtpmConn:
		return c.silent
	case *device:
		return c.silent
	}
	return false
}

// bound makes ctx's deadline bound each command from now on, for a TPM
// kept open across calls.
func (t *TPM) bound(ctx context.Context) {
	if b, ok := t.ch.(interface{ setLimit(limit) }); ok {
		b.setLimit(limitOf(ctx))
	}
}

// device is a TPM character device; each read returns one whole response.
// A character device has no deadlines, so each read and write runs aside
// and is abandoned when it outlives the timeout: a stuck TPM fails the
// call instead of hanging a pull.
type device struct {
	f     *os.File
	limit limit
	// silent is set once a command went unanswered.
	silent bool
}

func (d *device) setLimit(l limit) { d.limit = l }

func (d *device) bounded(op func() (int, error)) (int, error) {
	type result struct {
		n   int
		err error
	}
	wait := d.limit.next()
	done := make(chan result, 1)
	go func() { n, err := op(); done <- result{n, err} }()
	select {
	case r := <-done:
		return r.n, r.err
	case <-time.After(wait):
		d.silent = true
		return 0, fmt.Errorf("attest: TPM device did not answer %s", d.limit.exceeded(wait))
	}
}

func (d *device) Write(p []byte) (int, error) {
	return d.bounded(func() (int, error) { return d.f.Write(p) })
}
func (d *device) Read(p []byte) (int, error) {
	return d.bounded(func() (int, error) { return d.f.Read(p) })
}
func (d *device) Close() error                  { return d.f.Close() }
func (*device) MeasurementLog() ([]byte, error) { return nil, errNoLog }

var errNoLog = errors.New("attest: no event log configured")

func openDevice(ctx context.Context, path string) (channel, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("attest: open TPM device: %w", err)
	}
	return &device{f: f, limit: limitOf(ctx)}, nil
}

// limit bounds the commands on one TPM connection: all of them together
// by the deadline of the context the connection was opened (or last
// bound) with, so a TPM that stops answering ends the call at its
// deadline however many commands the caller goes on to send; each by
// DefaultTPMTimeout when the context has none.
type limit struct{ deadline time.Time }

func limitOf(ctx context.Context) limit {
	dl, _ := ctx.Deadline()
	return limit{dl}
}

// exceeded says how a TPM that did not answer ran out of time.
func (l limit) exceeded(wait time.Duration) string {
	if l.deadline.IsZero() {
		return fmt.Sprintf("within %s", wait.Round(time.Millisecond))
	}
	return "before the request's deadline"
}

// next is how long the next command may take.
func (l limit) next() time.Duration {
	if l.deadline.IsZero() {
		return DefaultTPMTimeout
	}
	return max(time.Until(l.deadline), 0)
}

// swtpmConn speaks swtpm's TCP data channel: raw TPM commands and
// responses. TCP may split a response across reads, so Read assembles the
// whole response from its header's size before handing it over, as a
// device would. Every command carries a deadline.
type swtpmConn struct {
	c     net.Conn
	addr  string
	limit limit
	// wait is what the command in progress was allowed.
	wait time.Duration
	// silent is set once a command went unanswered.
	silent  bool
	pending []byte
}

// DialSwtpm connects to swtpm's TCP data channel. The connection reads
// whole responses and bounds every command by ctx's deadline; tests use it
// to drive the TPM directly (extend PCRs) as firmware would.
func DialSwtpm(ctx context.Context, addr string) (io.ReadWriteCloser, error) {
	return dialSwtpm(ctx, addr)
}

func dialSwtpm(ctx context.Context, addr string) (*swtpmConn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("attest: connect to swtpm at %s: %w", addr, err)
	}
	return &swtpmConn{c: c, addr: addr, limit: limitOf(ctx)}, nil
}

func (s *swtpmConn) setLimit(l limit) { s.limit = l }

const maxResponse = 1 << 20

func (s *swtpmConn) Write(cmd []byte) (int, error) {
	s.pending = nil
	s.wait = s.limit.next()
	if err := s.c.SetDeadline(time.Now().Add(s.wait)); err != nil {
		return 0, err
	}
	if _, err := s.c.Write(cmd); err != nil {
		return 0, s.ioError("write", err)
	}
	var hdr [10]byte
	if _, err := io.ReadFull(s.c, hdr[:]); err != nil {
		return 0, s.ioError("response", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxResponse {
		return 0, fmt.Errorf("attest: swtpm response size %d out of range", size)
	}
	resp := make([]byte, size)
	copy(resp, hdr[:])
	if _, err := io.ReadFull(s.c, resp[10:]); err != nil {
		return 0, s.ioError("response body", err)
	}
	s.pending = resp
	return len(cmd), nil
}

// ioError says a TPM that stopped answering did so, in the words the
// device path uses, rather than as a socket timeout.
func (s *swtpmConn) ioError(what string, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.silent = true
		return fmt.Errorf("attest: the TPM (swtpm at %s) did not answer %s", s.addr, s.limit.exceeded(s.wait))
	}
	return fmt.Errorf("attest: swtpm %s: %w", what, err)
}

func (s *swtpmConn) Read(p []byte) (int, error) {
	if s.pending == nil {
		return 0, errors.New("attest: swtpm read without a command")
	}
	n := copy(p, s.pending)
	s.pending = s.pending[n:]
	if len(s.pending) == 0 {
		s.pending = nil
	}
	return n, nil
}

func (s *swtpmConn) Close() error                    { return s.c.Close() }
func (s *swtpmConn) MeasurementLog() ([]byte, error) { return nil, errNoLog }

// openSimulator is set by package attest/simtpm, which links the cgo
// simulator; production binaries leave it out (it costs every exec-mode
// process several milliseconds of start-up).
var openSimulator func() (io.ReadWriteCloser, error)

// RegisterSimulator makes OpenTPM("simulator") use open.
func RegisterSimulator(open func() (io.ReadWriteCloser, error)) { openSimulator = open }

type simChannel struct{ io.ReadWriteCloser }

func (simChannel) MeasurementLog() ([]byte, error) { return nil, errNoLog }
