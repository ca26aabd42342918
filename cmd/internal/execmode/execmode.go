// Package execmode serves ocicrypt's exec-mode keyprovider protocol: one
// JSON request on stdin, one reply on stdout, forwarded to the node's agent
// when it runs, served in this process otherwise. The attested binary
// ('attested keyprovider') and the lighter attested-keyprovider share it.
package execmode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/localfile"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/cmd/internal/nodeconfig"
	"github.com/attested-dev/attested/keyprovider"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// rpcPrefix is how grpc-go prints a status; operators need its message.
var rpcPrefix = regexp.MustCompile(`rpc error: code = \w+ desc = `)

// PlainError is err's text without gRPC's status framing.
func PlainError(err error) string {
	return rpcPrefix.ReplaceAllString(err.Error(), "")
}

// Flags is attested-keyprovider's command line: the settings of node.yaml,
// as 'attested keyprovider' takes them.
func Flags(c *nodeconfig.Config) *pflag.FlagSet {
	fs := pflag.NewFlagSet("attested-keyprovider", pflag.ContinueOnError)
	nodeconfig.Flags(fs, c)
	return fs
}

// Run serves one request from in to out, bounded by c.Timeout: ocicrypt
// never cancels a provider, so we bound ourselves, and a watchdog ends the
// process if something ignores the context.
func Run(c *nodeconfig.Config, in io.Reader, out io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout)
	defer cancel()
	watchdog := time.AfterFunc(c.Timeout+2*time.Second, func() {
		fmt.Fprintf(os.Stderr, "attested: request did not finish within %s; giving up\n", c.Timeout)
		os.Exit(1)
	})
	defer watchdog.Stop()
	req, err := io.ReadAll(io.LimitReader(in, keyprovider.MaxRequest+1))
	if err != nil {
		return fmt.Errorf("read request: %w", err)
	}
	reply, err := serve(ctx, c, req)
	if err != nil {
		return err
	}
	_, err = out.Write(reply)
	return err
}

// serve forwards to the agent when one answers (it holds a warm
// session in memory), and otherwise serves the request in this process.
func serve(ctx context.Context, c *nodeconfig.Config, in []byte) ([]byte, error) {
	if c.Agent != "" {
		out, answered, err := forwardToAgent(ctx, c.Agent, in)
		if answered {
			// The agent's answer is final, refusals included.
			if err != nil {
				if _, ok := status.FromError(err); !ok {
					return nil, err
				}
				return nil, errors.New(strings.TrimPrefix(status.Convert(err).Message(), "attested: "))
			}
			return out, nil
		}
	}
	h, closeFn, err := NewHandler(c, &attest.FileStore{Dir: c.RunDir})
	if err != nil {
		return nil, err
	}
	defer closeFn()
	return h.Handle(ctx, in)
}

// agentConnectTimeout bounds the wait for the agent's socket to accept.
const agentConnectTimeout = 500 * time.Millisecond

// forwardToAgent sends the request to the agent. answered is false when no
// agent could be reached, so the caller serves the request itself.
func forwardToAgent(ctx context.Context, addr string, in []byte) (out []byte, answered bool, err error) {
	path := strings.TrimPrefix(addr, "unix://")
	if _, err := os.Lstat(path); err != nil {
		return nil, false, nil
	}
	// Requests carry layer keys (wrap) and get them back (unwrap): only an
	// agent of this user, behind a directory nobody else can change, gets
	// them. A planted socket is an attack, not a reason to fall back.
	if err := localfile.CheckDir(filepath.Dir(path)); err != nil {
		return nil, true, fmt.Errorf("agent socket directory: %w", err)
	}
	if err := localfile.CheckSocket(path); err != nil {
		return nil, true, fmt.Errorf("agent socket: %w", err)
	}
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, false, nil
	}
	defer cc.Close()
	if !connected(ctx, cc) {
		return nil, false, nil
	}
	var op struct {
		Op string `json:"op"`
	}
	_ = json.Unmarshal(in, &op)
	client := keyproviderpb.NewKeyProviderServiceClient(cc)
	req := &keyproviderpb.KeyProviderKeyWrapProtocolInput{KeyProviderKeyWrapProtocolInput: in}
	var resp *keyproviderpb.KeyProviderKeyWrapProtocolOutput
	if op.Op == "keywrap" {
		resp, err = client.WrapKey(ctx, req)
	} else {
		resp, err = client.UnWrapKey(ctx, req)
	}
	if err != nil {
		return nil, true, err
	}
	return resp.GetKeyProviderKeyWrapProtocolOutput(), true, nil
}

// connected reports whether the connection to the agent comes up.
func connected(ctx context.Context, cc *grpc.ClientConn) bool {
	ctx, cancel := context.WithTimeout(ctx, agentConnectTimeout)
	defer cancel()
	cc.Connect()
	for {
		s := cc.GetState()
		switch s {
		case connectivity.Ready:
			return true
		case connectivity.TransientFailure, connectivity.Shutdown:
			return false
		}
		if !cc.WaitForStateChange(ctx, s) {
			return false
		}
	}
}

// NewHandler wires the keyprovider to the broker and, on an enrolled node,
// to the TPM (sessions shared through store, or in memory when it is nil).
// A host that is not enrolled can still wrap.
func NewHandler(c *nodeconfig.Config, store *attest.FileStore) (*keyprovider.Handler, func(), error) {
	h := &keyprovider.Handler{Name: c.Provider}
	if c.Broker == "" {
		h.Unwrapper = Failing{fmt.Errorf("no broker configured (--broker or broker: in %s)", nodeconfig.DefaultPath)}
		return h, func() {}, nil
	}
	cc, err := conn.Dial(conn.Options{Addr: c.Broker, CAFile: c.BrokerCA, Timeout: c.Timeout})
	if err != nil {
		return nil, nil, err
	}
	b := apiv1.NewBrokerClient(cc)
	cacheDir := c.CacheDir
	if cacheDir == "" {
		if d, err := os.UserCacheDir(); err == nil {
			cacheDir = filepath.Join(d, "attested")
		}
	}
	// Dial read the same file, so it parses.
	ca, err := conn.CAPool(c.BrokerCA)
	if err != nil {
		cc.Close()
		return nil, nil, err
	}
	h.Keys = &keyprovider.BrokerKeys{Broker: b, CA: ca, Addr: c.Broker, CacheDir: cacheDir}
	st, err := attest.LoadState(c.StateDir)
	if err != nil {
		h.Unwrapper = Failing{err}
		return h, func() { cc.Close() }, nil
	}
	sessions := &attest.Sessions{
		Broker: b, State: st, Store: store, Logs: c.Logs(),
		TPM: func(ctx context.Context) (*attest.TPM, error) { return attest.OpenTPM(ctx, c.TPM) },
	}
	h.Unwrapper = &keyprovider.NodeUnwrapper{Broker: b, Sessions: sessions, BrokerID: st.Broker}
	return h, func() { cc.Close() }, nil
}

// Failing is an Unwrapper for a host that cannot unwrap, saying why.
type Failing struct{ Err error }

// Unwrap implements keyprovider.Unwrapper.
func (f Failing) Unwrap(context.Context, annotation.Annotation, []byte) ([]byte, error) {
	return nil, keyprovider.WithCode(codes.FailedPrecondition, f.Err)
}
