package load

import (
	"context"
	"fmt"
	"io"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Operations the recorder times. The node's view includes its TPM work;
// the RPC rows are the broker's share, as the node's gRPC client sees it.
const (
	OpAttestation   = "attestation (node: challenge, TPM evidence, appraisal)"
	OpChallengeRPCs = "  challenge+attest RPCs"
	OpChallengeRPC  = "    Challenge RPC"
	OpAttestRPC     = "    Attest RPC"
	OpUnwrap        = "layer unwrap (node: session check, release, TPM open)"
	OpUnwrapRPC     = "  Unwrap RPC"
	OpRefusal       = "refused unwrap (failing nodes)"
	OpRefusalRPC    = "  Unwrap RPC, refused"
	OpPull          = "pull (all layers of an image, in parallel)"
)

var opOrder = []string{OpAttestation, OpChallengeRPCs, OpChallengeRPC, OpAttestRPC, OpUnwrap, OpUnwrapRPC, OpRefusal, OpRefusalRPC, OpPull}

// Recorder collects latencies per operation and failures by message.
type Recorder struct {
	mu      sync.Mutex
	samples map[string][]time.Duration
	errs    map[string]int
	// from is when recording began (Reset); ops that started before are
	// not counted.
	from time.Time
}

// NewRecorder returns an empty recorder.
func NewRecorder() *Recorder {
	return &Recorder{samples: map[string][]time.Duration{}, errs: map[string]int{}}
}

// Reset drops everything recorded and counts only operations starting
// from now.
func (r *Recorder) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples, r.errs, r.from = map[string][]time.Duration{}, map[string]int{}, time.Now()
}

// Observe records one operation that started at start and just ended.
func (r *Recorder) Observe(op string, start time.Time) { r.Add(op, start, time.Since(start)) }

// Add records one operation that started at start and took d.
func (r *Recorder) Add(op string, start time.Time, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if start.Before(r.from) {
		return
	}
	r.samples[op] = append(r.samples[op], d)
}

var nodeNameRe = regexp.MustCompile(`\b(load|storm|node)-?\d+\b|127\.0\.0\.1:\d+`)

// Fail records a failure; messages naming a node or a port are counted
// together.
func (r *Recorder) Fail(op string, err error) {
	msg := nodeNameRe.ReplaceAllStringFunc(fmt.Sprintf("%s: %v", strings.TrimSpace(op), err), func(s string) string {
		if strings.HasPrefix(s, "127.") {
			return "127.0.0.1:PORT"
		}
		return "NODE"
	})
	r.mu.Lock()
	r.errs[msg]++
	r.mu.Unlock()
}

// Errors returns the failures counted by message, and their total.
func (r *Recorder) Errors() (map[string]int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.errs))
	total := 0
	for k, v := range r.errs {
		out[k] = v
		total += v
	}
	return out, total
}

// Stat summarises one operation's latencies.
type Stat struct {
	Op                 string
	Count              int
	P50, P90, P99, Max time.Duration
	// PerSecond is Count over the run's elapsed time.
	PerSecond float64
}

// Stats summarises every operation recorded, over elapsed.
func (r *Recorder) Stats(elapsed time.Duration) []Stat {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Stat
	for _, op := range opOrder {
		if ds := r.samples[op]; len(ds) > 0 {
			out = append(out, summarise(op, ds, elapsed))
		}
	}
	return out
}

func summarise(op string, ds []time.Duration, elapsed time.Duration) Stat {
	s := slices.Clone(ds)
	slices.Sort(s)
	st := Stat{Op: op, Count: len(s), P50: Percentile(s, 50), P90: Percentile(s, 90), P99: Percentile(s, 99), Max: s[len(s)-1]}
	if elapsed > 0 {
		st.PerSecond = float64(len(s)) / elapsed.Seconds()
	}
	return st
}

// Percentile returns the p-th percentile of sorted by the nearest-rank
// method: the smallest sample at least p% of the samples are <= to.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(float64(len(sorted))*p/100 + 0.999999999)
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// WriteTable prints stats as an aligned table.
func WriteTable(w io.Writer, stats []Stat) {
	width := len("operation")
	for _, s := range stats {
		width = max(width, len(s.Op))
	}
	fmt.Fprintf(w, "%-*s %8s %10s %10s %10s %10s %10s\n", width, "operation", "count", "per second", "p50", "p90", "p99", "max")
	for _, s := range stats {
		fmt.Fprintf(w, "%-*s %8d %10.1f %10s %10s %10s %10s\n", width, s.Op, s.Count, s.PerSecond, ms(s.P50), ms(s.P90), ms(s.P99), ms(s.Max))
	}
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000)
}

// SortedErrors lists failures, most frequent first.
func SortedErrors(errs map[string]int) []string {
	keys := make([]string, 0, len(errs))
	for k := range errs {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if errs[keys[i]] != errs[keys[j]] {
			return errs[keys[i]] > errs[keys[j]]
		}
		return keys[i] < keys[j]
	})
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = fmt.Sprintf("%6d x %s", errs[k], k)
	}
	return out
}

// timedBroker is a node's broker client that times the RPCs the node's
// code makes through it.
type timedBroker struct {
	apiv1.BrokerClient
	// attest carries Challenge and Attest (see FleetOptions.SplitConns).
	attest apiv1.BrokerClient
	rec    *Recorder
	node   *Node
	// challenge is when the node's last Challenge started and how long it
	// took; a node attests one at a time (attest.Sessions), so one field
	// suffices.
	challenge    time.Time
	challengeDur time.Duration
}

func (t *timedBroker) Challenge(ctx context.Context, in *apiv1.ChallengeRequest, opts ...grpc.CallOption) (*apiv1.ChallengeResponse, error) {
	start := time.Now()
	r, err := t.attest.Challenge(ctx, in, opts...)
	if err == nil {
		t.challenge, t.challengeDur = start, time.Since(start)
		t.rec.Add(OpChallengeRPC, start, t.challengeDur)
	}
	return r, err
}

func (t *timedBroker) Attest(ctx context.Context, in *apiv1.AttestRequest, opts ...grpc.CallOption) (*apiv1.AttestResponse, error) {
	start := time.Now()
	r, err := t.attest.Attest(ctx, in, opts...)
	if err == nil {
		d := time.Since(start)
		t.rec.Add(OpAttestRPC, start, d)
		// Challenge and Attest RPCs of one attestation, without the TPM
		// work between them.
		t.rec.Add(OpChallengeRPCs, t.challenge, t.challengeDur+d)
	}
	return r, err
}

func (t *timedBroker) Unwrap(ctx context.Context, in *apiv1.UnwrapRequest, opts ...grpc.CallOption) (*apiv1.UnwrapResponse, error) {
	start := time.Now()
	r, err := t.BrokerClient.Unwrap(ctx, in, opts...)
	switch {
	case err == nil:
		t.rec.Observe(OpUnwrapRPC, start)
	case status.Code(err) == codes.PermissionDenied:
		t.rec.Observe(OpRefusalRPC, start)
	}
	return r, err
}
