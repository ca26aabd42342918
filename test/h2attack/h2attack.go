// Package h2attack speaks raw HTTP/2 to a gRPC server the way an attacker
// would, for tests of the broker's limits: it declares a request of any
// size and streams the body from one small buffer, so that the attacker's
// own memory stays flat while the server's is measured, and it reports how
// much of the body the server let it send before answering. A server that
// refuses a request before reading it grants no flow-control window beyond
// the initial one, so Result.Sent tells whether the body was read.
package h2attack

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TLSConfig trusts the CA in caFile and offers HTTP/2.
func TLSConfig(caFile string) (*tls.Config, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("h2attack: %s holds no certificate", caFile)
	}
	return &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}, nil
}

// Conn is one HTTP/2 connection.
type Conn struct {
	nc  net.Conn
	fr  *http2.Framer
	enc *hpack.Encoder
	hb  bytes.Buffer

	wmu sync.Mutex // frame writes

	mu         sync.Mutex
	cond       *sync.Cond
	connWindow int64
	initWindow int64
	streams    map[uint32]*stream
	nextID     uint32
	err        error // why the connection ended
	goAway     *goAway
	done       chan struct{}
}

type goAway struct {
	code  http2.ErrCode
	debug string
}

type stream struct {
	window int64
	ended  bool
	res    Result
}

// Result is the server's answer to one call.
type Result struct {
	// Code and Message are grpc-status and grpc-message; Code is -1 when
	// the server answered with no gRPC status (a reset or a closed
	// connection).
	Code    int
	Message string
	// Sent is how many body bytes (after the 5-byte prefix) the server let
	// through before it answered.
	Sent int64
	// Reset is set when the server reset the stream.
	Reset bool
	// Err is a connection-level failure.
	Err error
}

// Dial opens a TLS connection to addr and does the HTTP/2 handshake, from
// the local address laddr when one is given (127.0.0.N poses as another
// source on loopback).
func Dial(ctx context.Context, addr string, cfg *tls.Config, laddr string) (*Conn, error) {
	d := &net.Dialer{Timeout: 10 * time.Second}
	if laddr != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(laddr)}
	}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("h2attack: TLS handshake: %w", err)
	}
	return Start(tc)
}

// Start speaks HTTP/2 over an established connection.
func Start(nc net.Conn) (*Conn, error) {
	c := &Conn{nc: nc, connWindow: 65535, initWindow: 65535, streams: map[uint32]*stream{}, nextID: 1, done: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	c.fr = http2.NewFramer(nc, nc)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 1 << 20
	c.enc = hpack.NewEncoder(&c.hb)
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		nc.Close()
		return nil, err
	}
	if err := c.fr.WriteSettings(); err != nil {
		nc.Close()
		return nil, err
	}
	go c.read()
	return c, nil
}

// Close ends the connection.
func (c *Conn) Close() error { return c.nc.Close() }

// Done is closed when the server has closed the connection (or it failed).
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err says why the connection ended; nil while it is open.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// GoAway returns the server's GOAWAY frame's error code and debug data, if
// it sent one.
func (c *Conn) GoAway() (http2.ErrCode, string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.goAway == nil {
		return 0, "", false
	}
	return c.goAway.code, c.goAway.debug, true
}

func (c *Conn) read() {
	defer close(c.done)
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			c.mu.Lock()
			c.err = err
			for _, s := range c.streams {
				if !s.ended {
					s.ended, s.res.Code, s.res.Err = true, -1, err
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			c.mu.Lock()
			if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
				delta := int64(v) - c.initWindow
				c.initWindow = int64(v)
				for _, s := range c.streams {
					s.window += delta
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
			c.write(func() error { return c.fr.WriteSettingsAck() })
		case *http2.WindowUpdateFrame:
			c.mu.Lock()
			if f.StreamID == 0 {
				c.connWindow += int64(f.Increment)
			} else if s := c.streams[f.StreamID]; s != nil {
				s.window += int64(f.Increment)
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		case *http2.MetaHeadersFrame:
			c.mu.Lock()
			if s := c.streams[f.StreamID]; s != nil {
				for _, hf := range f.Fields {
					switch hf.Name {
					case "grpc-status":
						s.res.Code, _ = strconv.Atoi(hf.Value)
					case "grpc-message":
						s.res.Message, _ = url.PathUnescape(hf.Value)
					}
				}
				if f.StreamEnded() {
					s.ended = true
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		case *http2.DataFrame:
			// Give back what the server sends so that it never blocks.
			// (A frame is only valid until the next ReadFrame.)
			if n, id := len(f.Data()), f.StreamID; n > 0 {
				c.write(func() error {
					if err := c.fr.WriteWindowUpdate(0, uint32(n)); err != nil {
						return err
					}
					return c.fr.WriteWindowUpdate(id, uint32(n))
				})
			}
			if f.StreamEnded() {
				c.mu.Lock()
				if s := c.streams[f.StreamID]; s != nil {
					s.ended = true
				}
				c.cond.Broadcast()
				c.mu.Unlock()
			}
		case *http2.RSTStreamFrame:
			c.mu.Lock()
			if s := c.streams[f.StreamID]; s != nil && !s.ended {
				s.ended, s.res.Reset = true, true
				if s.res.Code == 0 && s.res.Message == "" {
					s.res.Code = -1
				}
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		case *http2.PingFrame:
			if !f.IsAck() {
				data := f.Data
				c.write(func() error { return c.fr.WritePing(true, data) })
			}
		case *http2.GoAwayFrame:
			c.mu.Lock()
			c.goAway = &goAway{code: f.ErrCode, debug: string(f.DebugData())}
			c.cond.Broadcast()
			c.mu.Unlock()
		}
	}
}

// Ping sends an HTTP/2 PING.
func (c *Conn) Ping(data [8]byte) error {
	return c.write(func() error { return c.fr.WritePing(false, data) })
}

func (c *Conn) write(f func() error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return f()
}

// Request is one gRPC call's request: the message is Prefix followed by
// Fill bytes of value Filler.
type Request struct {
	Method   string
	Metadata map[string]string
	Prefix   []byte
	Fill     int64
	Filler   byte
	// Declare, when larger than the message, is the length the 5-byte
	// prefix claims: the body then never ends, as a slow caller's would.
	Declare int64
	// Timeout bounds the whole call (default 60 s).
	Timeout time.Duration
}

// Call sends a request of method with the given metadata whose message is
// prefix plus fill bytes of value filler (see Do).
func (c *Conn) Call(method string, md map[string]string, prefix []byte, fill int64, filler byte, timeout time.Duration) Result {
	return c.Do(Request{Method: method, Metadata: md, Prefix: prefix, Fill: fill, Filler: filler, Timeout: timeout})
}

// Do starts a gRPC call, sends as much of its body as the server's flow
// control allows, and waits for the server's answer, or until the timeout.
func (c *Conn) Do(req Request) Result {
	method, md, prefix, fill, filler, timeout := req.Method, req.Metadata, req.Prefix, req.Fill, req.Filler, req.Timeout
	if timeout <= 0 {
		timeout = 60 * time.Second
	}
	total := int64(len(prefix)) + fill
	declared := max(total, req.Declare)
	// Stream IDs must reach the server in increasing order: take one and
	// send its HEADERS under the same lock.
	var id uint32
	var s *stream
	err := c.write(func() error {
		c.mu.Lock()
		id = c.nextID
		c.nextID += 2
		s = &stream{window: c.initWindow}
		c.streams[id] = s
		c.mu.Unlock()
		c.hb.Reset()
		for _, kv := range [][2]string{
			{":method", "POST"}, {":scheme", "https"}, {":path", method}, {":authority", "localhost"},
			{"content-type", "application/grpc"}, {"te", "trailers"},
		} {
			c.enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
		}
		for k, v := range md {
			c.enc.WriteField(hpack.HeaderField{Name: k, Value: v})
		}
		return c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hb.Bytes(), EndHeaders: true})
	})
	if err != nil {
		return Result{Code: -1, Err: err}
	}

	var head [5]byte
	binary.BigEndian.PutUint32(head[1:], uint32(declared))
	body := io.MultiReader(bytes.NewReader(head[:]), bytes.NewReader(prefix), &fillReader{n: fill, b: filler})
	remaining := 5 + total
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { c.mu.Lock(); c.cond.Broadcast(); c.mu.Unlock() })
	defer timer.Stop()
	chunk := make([]byte, 16384)
	var sent int64
	for remaining > 0 {
		c.mu.Lock()
		for !s.ended && c.err == nil && (s.window <= 0 || c.connWindow <= 0) && time.Now().Before(deadline) {
			c.cond.Wait()
		}
		if s.ended || c.err != nil || !time.Now().Before(deadline) {
			c.mu.Unlock()
			break
		}
		n := min(int64(len(chunk)), s.window, c.connWindow, remaining)
		s.window -= n
		c.connWindow -= n
		c.mu.Unlock()
		if _, err := io.ReadFull(body, chunk[:n]); err != nil {
			return Result{Code: -1, Err: err}
		}
		remaining -= n
		end := remaining == 0 && declared == total
		if err := c.write(func() error { return c.fr.WriteData(id, end, chunk[:n]) }); err != nil {
			break
		}
		sent += n
	}
	c.mu.Lock()
	for !s.ended && c.err == nil && time.Now().Before(deadline) {
		c.cond.Wait()
	}
	res := s.res
	if !s.ended && c.err == nil {
		res.Code, res.Err = -1, errors.New("h2attack: no answer before the timeout")
	}
	delete(c.streams, id)
	c.mu.Unlock()
	res.Sent = max(0, sent-5)
	if !s.ended {
		// Leave nothing half-open behind.
		_ = c.write(func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
	}
	return res
}

type fillReader struct {
	n int64
	b byte
}

func (r *fillReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, io.EOF
	}
	n := min(int64(len(p)), r.n)
	for i := range p[:n] {
		p[i] = r.b
	}
	r.n -= n
	return int(n), nil
}

// BytesField is the protobuf encoding of the key and length of a
// length-delimited field (bytes, string or message) number num holding n
// bytes: a request with one large field is this prefix and n bytes.
func BytesField(num int, n int64) []byte {
	b := binary.AppendUvarint(nil, uint64(num)<<3|2)
	return binary.AppendUvarint(b, uint64(n))
}
