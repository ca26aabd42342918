package load

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containers/ocicrypt/config"
	ocikp "github.com/containers/ocicrypt/keywrap/keyprovider"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/keyprovider"
)

// Image is what every node pulls: layer annotations as a pipeline wrote
// them, and the optsdata each must give back.
type Image struct {
	Requests [][]byte // keyunwrap requests, one per layer
	OptsData [][]byte
}

// Setup applies policy name (the PCRs in pcrs, SHA-256 bank) and creates
// key name under it, then wraps layers random layer keys for that key as
// a pipeline does (keyprovider keywrap with the broker's signed public
// key).
func Setup(ctx context.Context, admin apiv1.AdminClient, cc grpc.ClientConnInterface, caFile, addr, name string, pcrs map[int][]byte, layers int) (*Image, error) {
	var y strings.Builder
	fmt.Fprintf(&y, "name: %s\npcrs:\n", name)
	for i, v := range pcrs {
		fmt.Fprintf(&y, "  %d: [\"%s\"]\n", i, hex.EncodeToString(v))
	}
	if _, err := admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: y.String()}); err != nil {
		return nil, fmt.Errorf("apply policy %s: %w", name, err)
	}
	if _, err := admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: name, Policy: name}); err != nil {
		return nil, fmt.Errorf("create key %s: %w", name, err)
	}
	ca, err := conn.CAPool(caFile)
	if err != nil {
		return nil, err
	}
	h := &keyprovider.Handler{Keys: &keyprovider.BrokerKeys{Broker: apiv1.NewBrokerClient(cc), CA: ca, Addr: addr}}
	img := &Image{}
	for range layers {
		// ocicrypt's optsdata is a JSON document holding the layer key;
		// random bytes serve: the broker never looks inside.
		opts := make([]byte, 96)
		rand.Read(opts)
		in, err := json.Marshal(ocikp.KeyProviderKeyWrapProtocolInput{Operation: ocikp.OpKeyWrap, KeyWrapParams: ocikp.KeyWrapParams{
			Ec:       &config.EncryptConfig{Parameters: map[string][][]byte{keyprovider.DefaultName: {[]byte("key=" + name)}}},
			OptsData: opts}})
		if err != nil {
			return nil, err
		}
		out, err := h.Handle(ctx, in)
		if err != nil {
			return nil, fmt.Errorf("keywrap: %w", err)
		}
		var res ocikp.KeyProviderKeyWrapProtocolOutput
		if err := json.Unmarshal(out, &res); err != nil {
			return nil, err
		}
		req, err := json.Marshal(ocikp.KeyProviderKeyWrapProtocolInput{Operation: ocikp.OpKeyUnwrap,
			KeyUnwrapParams: ocikp.KeyUnwrapParams{Annotation: res.KeyWrapResults.Annotation}})
		if err != nil {
			return nil, err
		}
		img.Requests = append(img.Requests, req)
		img.OptsData = append(img.OptsData, opts)
	}
	return img, nil
}

// Workload says what each node does.
type Workload struct {
	Image *Image
	// AttestEvery makes each node attest afresh before every AttestEvery-th
	// pull (as an agent's periodic re-attestation or a reboot would); 0
	// attests once, before the first pull.
	AttestEvery int
	// Pause is each node's mean rest between pulls (drawn uniformly from
	// half to one and a half times it, and a node's first pull waits a
	// random part of it, so nodes do not pull in lockstep).
	Pause time.Duration
	// Timeout bounds each operation (the node's configured deadline).
	Timeout time.Duration
	// OnRelease, when set, is called for each release a node received
	// (the optsdata it opened), before the counters are updated.
	OnRelease func(n *Node)
}

// Result is what a run saw.
type Result struct {
	Elapsed time.Duration
	Stats   []Stat
	// Errors counts failures by message; ErrorCount is their total.
	Errors     map[string]int
	ErrorCount int
	// Releases counts the layer keys each node received.
	Releases map[string]int
	// WrongReleases counts layer keys released to failing nodes.
	WrongReleases int
	// Refusals counts the refusals failing nodes got, as they must.
	Refusals int
	Pulls    int
}

// Run has every node pull the image until stop is closed, then waits for
// the pulls in flight. A node's operations are bounded by w.Timeout, not
// by stop, so none is cut off half way.
func (f *Fleet) Run(stop <-chan struct{}, w Workload) *Result {
	if w.Timeout <= 0 {
		w.Timeout = 30 * time.Second
	}
	f.rec.Reset()
	var mu sync.Mutex
	res := &Result{Releases: map[string]int{}}
	var pulls, refusals, wrong atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for _, n := range f.Nodes {
		wg.Go(func() {
			if w.Pause > 0 && !sleep(stop, mrand.N(w.Pause)) {
				return
			}
			for pull := 0; ; pull++ {
				select {
				case <-stop:
					return
				default:
				}
				if pull == 0 || (w.AttestEvery > 0 && pull%w.AttestEvery == 0) {
					f.attest(n, w)
				}
				released, refused := f.pull(n, w)
				pulls.Add(1)
				refusals.Add(int64(refused))
				if n.Failing {
					wrong.Add(int64(released))
				}
				if released > 0 {
					mu.Lock()
					res.Releases[n.Name] += released
					mu.Unlock()
				}
				if w.Pause > 0 && !sleep(stop, w.Pause/2+mrand.N(w.Pause)) {
					return
				}
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	res.Stats = f.rec.Stats(res.Elapsed)
	res.Errors, res.ErrorCount = f.rec.Errors()
	res.Pulls, res.Refusals, res.WrongReleases = int(pulls.Load()), int(refusals.Load()), int(wrong.Load())
	return res
}

// sleep waits d, or until stop closes (then it returns false).
func sleep(stop <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-stop:
		return false
	case <-t.C:
		return true
	}
}

// attest has the node attest afresh, as the agent's periodic
// re-attestation does.
func (f *Fleet) attest(n *Node, w Workload) {
	ctx, cancel := context.WithTimeout(context.Background(), w.Timeout)
	defer cancel()
	start := time.Now()
	_, err := n.Sessions.Refresh(ctx)
	switch {
	case err == nil:
		f.rec.Observe(OpAttestation, start)
	case n.Failing && status.Code(err) == codes.PermissionDenied:
		// A broker may refuse a failing node at appraisal already.
	default:
		f.rec.Fail(OpAttestation, fmt.Errorf("node %s: %w", n.Name, err))
	}
}

// pull unwraps every layer of the image at once, as ocicrypt does, and
// returns how many layer keys the node received and how many it was
// refused.
func (f *Fleet) pull(n *Node, w Workload) (released, refused int) {
	start := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	failed := false
	for i, req := range w.Image.Requests {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), w.Timeout)
			defer cancel()
			t0 := time.Now()
			out, err := n.Handler.Handle(ctx, req)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				released++
				if w.OnRelease != nil {
					w.OnRelease(n)
				}
				if n.Failing {
					failed = true
					f.rec.Fail(OpRefusal, fmt.Errorf("WRONG RELEASE: node %s fails policy (PCR %d extended) and was given a layer key", n.Name, FailingPCR))
					return
				}
				if err := checkOptsData(out, w.Image.OptsData[i]); err != nil {
					failed = true
					f.rec.Fail(OpUnwrap, fmt.Errorf("node %s: %w", n.Name, err))
					return
				}
				f.rec.Observe(OpUnwrap, t0)
			case n.Failing && isPolicyRefusal(err):
				refused++
				f.rec.Observe(OpRefusal, t0)
			default:
				failed = true
				op := OpUnwrap
				if n.Failing {
					op = OpRefusal
				}
				f.rec.Fail(op, fmt.Errorf("node %s: %w", n.Name, err))
			}
		})
	}
	wg.Wait()
	if !failed && !n.Failing {
		f.rec.Observe(OpPull, start)
	}
	return released, refused
}

// isPolicyRefusal is the refusal a failing node must get: its PCR breaks
// the key's policy.
func isPolicyRefusal(err error) bool {
	return status.Code(err) == codes.PermissionDenied && strings.Contains(err.Error(), fmt.Sprintf("PCR %d differs from policy", FailingPCR))
}

func checkOptsData(reply, want []byte) error {
	var out ocikp.KeyProviderKeyWrapProtocolOutput
	if err := json.Unmarshal(reply, &out); err != nil {
		return fmt.Errorf("keyunwrap reply: %w", err)
	}
	if !bytes.Equal(out.KeyUnwrapResults.OptsData, want) {
		return errors.New("keyunwrap returned optsdata other than the layer's")
	}
	return nil
}

// AuditReleases counts the release records in the broker's audit, by
// node.
func AuditReleases(ctx context.Context, admin apiv1.AdminClient) (map[string]int, error) {
	r, err := admin.ListAudit(ctx, &apiv1.ListAuditRequest{Kind: "release"}, grpc.MaxCallRecvMsgSize(1<<30))
	if err != nil {
		return nil, fmt.Errorf("audit list: %w", err)
	}
	out := map[string]int{}
	for _, e := range r.GetEvents() {
		if e.GetAllowed() {
			out[e.GetNode()]++
		}
	}
	return out, nil
}

// CheckAudit compares the releases nodes received with the audit's
// records: every release a node received must have its record (the broker
// writes it before answering), and no failing node may have any. It
// returns the problems found.
func CheckAudit(seen, audited map[string]int, failing map[string]bool) []string {
	var out []string
	for node, n := range seen {
		if audited[node] < n {
			out = append(out, fmt.Sprintf("node %s received %d layer keys, the audit records %d releases", node, n, audited[node]))
		}
	}
	for node, n := range audited {
		if failing[node] && n > 0 {
			out = append(out, fmt.Sprintf("the audit records %d releases to node %s, which fails policy", n, node))
		}
	}
	return out
}
