package swtpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
)

// Behaviour is what a Proxy does with the TPM commands it receives.
type Behaviour int32

const (
	// Pass forwards commands to swtpm and its responses back.
	Pass Behaviour = iota
	// Hang reads commands and never answers, as a wedged TPM or bus.
	Hang
	// Fail answers every command with FailCode, as a TPM in failure mode
	// does, without forwarding it.
	Fail
)

// FailCode is the response code a failing Proxy answers with:
// TPM_RC_FAILURE, "commands not being accepted because of a TPM failure".
const FailCode = 0x101

// Proxy sits between the code under test and swtpm's data channel and
// can make the TPM hang or fail on demand. Like swtpm, it serves one
// connection at a time.
type Proxy struct {
	l      net.Listener
	target string
	mode   atomic.Int32

	mu    sync.Mutex
	conns []net.Conn
}

// NewProxy listens on a free loopback port and relays to s's data
// channel.
func NewProxy(s *TPM) (*Proxy, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{l: l, target: s.Addr()}
	go p.serve()
	return p, nil
}

// URI is the value of attested's --tpm that goes through the proxy.
func (p *Proxy) URI() string {
	return "swtpm://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(p.l.Addr().(*net.TCPAddr).Port))
}

// Set changes what the proxy does with the next commands.
func (p *Proxy) Set(b Behaviour) { p.mode.Store(int32(b)) }

// Close stops the proxy and drops its connections.
func (p *Proxy) Close() {
	p.l.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func (p *Proxy) serve() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		go p.relay(c)
	}
}

// relay serves one client connection, command by command, dialling swtpm
// only when a command is to be forwarded.
func (p *Proxy) relay(c net.Conn) {
	defer c.Close()
	var up net.Conn
	defer func() {
		if up != nil {
			up.Close()
		}
	}()
	for {
		cmd, err := readMessage(c)
		if err != nil {
			return
		}
		switch Behaviour(p.mode.Load()) {
		case Hang:
			// Hold the connection open, answering nothing, until the
			// client gives up.
			io.Copy(io.Discard, c)
			return
		case Fail:
			var resp [10]byte
			binary.BigEndian.PutUint16(resp[0:], 0x8001) // TPM_ST_NO_SESSIONS
			binary.BigEndian.PutUint32(resp[2:], 10)
			binary.BigEndian.PutUint32(resp[6:], FailCode)
			if _, err := c.Write(resp[:]); err != nil {
				return
			}
			continue
		}
		if up == nil {
			if up, err = net.Dial("tcp", p.target); err != nil {
				return
			}
		}
		if _, err := up.Write(cmd); err != nil {
			return
		}
		resp, err := readMessage(up)
		if err != nil {
			return
		}
		if _, err := c.Write(resp); err != nil {
			return
		}
	}
}

// readMessage reads one TPM command or response: a 10-byte header whose
// bytes 2-5 give the whole size, then the rest.
func readMessage(r io.Reader) ([]byte, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > 1<<20 {
		return nil, errors.New("swtpm proxy: message size out of range: " + fmt.Sprint(size))
	}
	msg := make([]byte, size)
	copy(msg, hdr[:])
	_, err := io.ReadFull(r, msg[10:])
	return msg, err
}
