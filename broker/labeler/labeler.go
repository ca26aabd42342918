// Package labeler keeps Kubernetes Node labels in step with what the broker
// knows of each node: attested.dev/trusted=true|false and one
// attested.dev/TAG=VALUE label per tag the node's TPM certified, so that a
// workload's nodeSelector or node affinity places it only on trusted nodes
// in the right place.
//
// A broker node maps to the Kubernetes Node of the same name (the agent
// DaemonSet enrolls each node under its spec.nodeName). Labels under
// attested.dev/ belong to the labeler: it sets them, corrects anyone else's
// change to them as soon as it sees it, and removes those it did not set.
// Other labels are never touched: every change is a JSON merge patch of
// labels only, so the labeler needs get, list, watch and patch on nodes and
// nothing else.
//
// Failing closed without flapping: the broker is polled every Interval. A
// failed poll changes nothing while the last good one is younger than
// Grace; past Grace every node is labelled attested.dev/trusted=false and
// loses its tag labels until the broker answers again. A Kubernetes node
// the broker does not know is "false" too.
package labeler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Broker is the part of the broker's Admin API the labeler reads.
type Broker interface {
	ListNodes(ctx context.Context, in *apiv1.ListNodesRequest, opts ...grpc.CallOption) (*apiv1.ListNodesResponse, error)
}

// Config tunes the labeler; zero values take the defaults.
type Config struct {
	// Interval is how often the broker is asked for node status.
	Interval time.Duration
	// Grace is how long the broker may fail to answer before every node is
	// labelled untrusted. Shorter than the broker's stale window makes
	// sense; shorter than two intervals flaps on one lost poll.
	Grace time.Duration
	// Timeout bounds every broker and Kubernetes API call.
	Timeout time.Duration
	// Log receives one line per label change and per broker outage.
	Log *slog.Logger
	// Now is the clock (tests).
	Now func() time.Time
}

// Defaults for Config.
const (
	DefaultInterval = 30 * time.Second
	DefaultGrace    = 2 * time.Minute
	DefaultTimeout  = 10 * time.Second
)

func (c *Config) setDefaults() error {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Grace == 0 {
		c.Grace = DefaultGrace
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	switch {
	case c.Interval < time.Second:
		return fmt.Errorf("labeler: interval %s is below 1s", c.Interval)
	case c.Grace < c.Interval:
		return fmt.Errorf("labeler: grace %s is shorter than the poll interval %s: one failed poll would mark every node untrusted", c.Grace, c.Interval)
	case c.Timeout <= 0 || c.Timeout > c.Interval:
		return fmt.Errorf("labeler: timeout %s must be positive and at most the poll interval %s", c.Timeout, c.Interval)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// Labeler reconciles Node labels with the broker's view.
type Labeler struct {
	broker Broker
	nodes  corev1client.NodeInterface
	cfg    Config

	mu sync.Mutex
	// view holds what the last good poll said, by node name; nil before the
	// first good poll.
	view map[string]desired
	// lastGood is the time of the last good poll (the start time before
	// the first one, so that a restart does not count as an outage).
	lastGood time.Time
	// closed is set once the broker has been unreachable beyond Grace.
	closed bool
	// pollErr is the last poll's error, nil after a good poll.
	pollErr error
	// skipped remembers the tags already reported as making no label.
	skipped map[string]string
}

// New returns a labeler that reads nodes from b and labels them through
// nodes (the core/v1 client's Nodes()).
func New(b Broker, nodes corev1client.NodeInterface, cfg Config) (*Labeler, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return &Labeler{broker: b, nodes: nodes, cfg: cfg, lastGood: cfg.Now(), skipped: map[string]string{}}, nil
}

// Poll asks the broker for every node's status and updates the labeler's
// view. A failed poll leaves the view as it was while within Grace, and
// past it switches every node to untrusted. The error is the broker's.
func (l *Labeler) Poll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.Timeout)
	defer cancel()
	resp, err := l.broker.ListNodes(ctx, &apiv1.ListNodesRequest{})
	now := l.cfg.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("labeler: broker: list nodes: %s", grpcMessage(err))
		down := now.Sub(l.lastGood).Round(time.Second)
		if down <= l.cfg.Grace {
			l.cfg.Log.Warn("broker did not answer; labels unchanged within the grace period",
				"error", err, "down", down.String(), "grace", l.cfg.Grace.String())
		} else if !l.closed {
			l.cfg.Log.Error("broker unreachable beyond the grace period: every node is now attested.dev/trusted=false",
				"error", err, "down", down.String(), "grace", l.cfg.Grace.String())
			l.closed = true
		} else {
			l.cfg.Log.Debug("broker still unreachable", "error", err, "down", down.String())
		}
		l.pollErr = err
		return err
	}
	if l.closed {
		l.cfg.Log.Info("broker answers again: labels follow its node status")
	}
	l.closed, l.pollErr, l.lastGood = false, nil, now
	view := make(map[string]desired, len(resp.GetNodes()))
	for _, n := range resp.GetNodes() {
		d := forNode(n)
		view[n.GetName()] = d
		if sig := strings.Join(d.skipped, "\n"); sig != l.skipped[n.GetName()] {
			for _, s := range d.skipped {
				l.cfg.Log.Warn("certified tag makes no label", "node", n.GetName(), "reason", s)
			}
			l.skipped[n.GetName()] = sig
		}
	}
	for name := range l.skipped {
		if _, ok := view[name]; !ok {
			delete(l.skipped, name)
		}
	}
	l.view = view
	return nil
}

// want returns the owned labels a Kubernetes node should carry, and false
// when its labels are to stay as they are (no good poll yet, broker
// unreachable within the grace period).
func (l *Labeler) want(name string) (desired, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.closed:
		return untrusted("broker unreachable: " + l.pollErr.Error()), true
	case l.view == nil:
		return desired{}, false
	}
	if d, ok := l.view[name]; ok {
		return d, true
	}
	return untrusted("not enrolled at the broker under this name"), true
}

// Sync brings one node's owned labels to what the labeler wants. It makes
// no API call when they already are.
func (l *Labeler) Sync(ctx context.Context, node *corev1.Node) error {
	d, ok := l.want(node.Name)
	if !ok {
		return nil
	}
	patch, changed := labelPatch(node.Labels, d.labels)
	if !changed {
		return nil
	}
	body, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, l.cfg.Timeout)
	defer cancel()
	if _, err := l.nodes.Patch(ctx, node.Name, types.MergePatchType, body, metav1.PatchOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("labeler: label node %q: %w", node.Name, err)
	}
	l.cfg.Log.Info("node labels set", "node", node.Name, "trusted", d.labels[TrustedLabel], "why", d.why,
		"change", changeString(node.Labels, patch))
	return nil
}

// FieldManager names the labeler in the nodes' managed fields.
const FieldManager = "attested-labeler"

// Step polls the broker once and syncs every node, listing them from the
// API server. It returns the poll's error, or the first node's that failed.
func (l *Labeler) Step(ctx context.Context) error {
	pollErr := l.Poll(ctx)
	lctx, cancel := context.WithTimeout(ctx, l.cfg.Timeout)
	list, err := l.nodes.List(lctx, metav1.ListOptions{})
	cancel()
	if err != nil {
		return errors.Join(pollErr, fmt.Errorf("labeler: list Kubernetes nodes: %w", err))
	}
	errs := []error{pollErr}
	for i := range list.Items {
		errs = append(errs, l.Sync(ctx, &list.Items[i]))
	}
	return errors.Join(errs...)
}

// Run labels nodes until ctx ends: it watches the Kubernetes nodes (a new
// node, or a change someone else made to an owned label, is dealt with at
// once) and polls the broker every Interval.
func (l *Labeler) Run(ctx context.Context) error {
	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer queue.ShutDown()
	enqueue := func(obj any) {
		if n, ok := obj.(*corev1.Node); ok {
			queue.Add(n.Name)
		}
	}
	store, informer := cache.NewInformerWithOptions(cache.InformerOptions{
		// The watch-list protocol where the client supports it (a fake
		// clientset, for one, does not).
		ListerWatcher: cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				ctx, cancel := context.WithTimeout(ctx, l.cfg.Timeout)
				defer cancel()
				return l.nodes.List(ctx, o)
			},
			// A watch is long by design; the reflector asks the API
			// server to end it after a few minutes (timeoutSeconds) and
			// starts another.
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return l.nodes.Watch(ctx, o)
			},
		}, l.nodes),
		ObjectType: &corev1.Node{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    enqueue,
			UpdateFunc: func(_, obj any) { enqueue(obj) },
		},
		// Only names and labels are kept: a Node's status (images,
		// conditions) is most of its size.
		Transform: func(obj any) (any, error) {
			if n, ok := obj.(*corev1.Node); ok {
				return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: n.Labels, ResourceVersion: n.ResourceVersion}}, nil
			}
			return obj, nil
		},
	})
	go informer.RunWithContext(ctx)

	go func() {
		for {
			name, quit := queue.Get()
			if quit {
				return
			}
			obj, exists, err := store.GetByKey(name)
			if err == nil && exists {
				err = l.Sync(ctx, obj.(*corev1.Node))
			}
			if err != nil && ctx.Err() == nil {
				l.cfg.Log.Warn("label update failed; retrying", "node", name, "error", err)
				queue.AddRateLimited(name)
			} else {
				queue.Forget(name)
			}
			queue.Done(name)
		}
	}()

	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		return ctx.Err()
	}
	tick := time.NewTicker(l.cfg.Interval)
	defer tick.Stop()
	for {
		_ = l.Poll(ctx) // logged by Poll
		for _, name := range store.ListKeys() {
			queue.Add(name)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// grpcMessage is a broker error in words: the gRPC framing ("rpc error:
// code = ...") replaced by the code's name.
func grpcMessage(err error) string {
	msg := err.Error()
	s, ok := status.FromError(err)
	if !ok {
		return msg
	}
	if strings.HasPrefix(msg, "rpc error:") {
		msg = s.Message()
	}
	return msg + " (" + s.Code().String() + ")"
}

// changeString describes a label patch for a log line.
func changeString(current map[string]string, patch map[string]any) string {
	labels := patch["metadata"].(map[string]any)["labels"].(map[string]any)
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		from := "(none)"
		if v, ok := current[k]; ok {
			from = v
		}
		to := "(removed)"
		if v, ok := labels[k].(string); ok {
			to = v
		}
		parts = append(parts, fmt.Sprintf("%s: %s -> %s", k, from, to))
	}
	return strings.Join(parts, ", ")
}
