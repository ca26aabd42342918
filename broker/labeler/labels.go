package labeler

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/validate/content"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Prefix starts every label the labeler owns. Labels under it are set and
// removed by the labeler alone; every other label is left as it is.
const Prefix = "attested.dev/"

// TrustedLabel says whether the broker holds the node trusted now.
const TrustedLabel = Prefix + "trusted"

// reserved are tag names that cannot become labels, because the labeler's
// own labels have these names (compared without case, so that
// "attested.dev/Trusted" cannot pass for the real one with a reader).
var reserved = []string{"trusted"}

// StatusTrusted is the one broker status that makes a node trusted.
const StatusTrusted = "trusted"

// owned reports whether the labeler owns a label key.
func owned(key string) bool { return strings.HasPrefix(key, Prefix) }

// desired is what the labeler wants a Kubernetes node's owned labels to be.
type desired struct {
	labels map[string]string
	// why explains the trusted label, for logs.
	why string
	// skipped lists certified tags that make no label, and why.
	skipped []string
}

// untrusted is the state of a node the broker does not vouch for.
func untrusted(why string) desired {
	return desired{labels: map[string]string{TrustedLabel: "false"}, why: why}
}

// forNode derives the labels of a broker node. A node is trusted only when
// the broker says so and the node is active: every other status (untrusted,
// stale, revoked, pending, one this version does not know, or none) is
// "false". Tag labels are published for a trusted node only: a label is a
// claim the scheduler acts on, and for a node whose evidence no longer
// holds, its TPM's certification of a tag is no longer current either. So a
// selector on a tag alone (attested.dev/region=EU) lands on trusted nodes
// only, too.
func forNode(n *apiv1.Node) desired {
	status := n.GetStatus()
	if status != StatusTrusted {
		why := "status " + quoteOr(status, "(none reported)")
		if r := n.GetStatusReason(); r != "" {
			why += ": " + r
		}
		return untrusted(why)
	}
	if n.GetState() != apiv1.NodeState_NODE_STATE_ACTIVE {
		// The broker would never report this; if it does, believe the
		// less trusting half.
		return untrusted(fmt.Sprintf("status trusted but enrollment state %s", n.GetState()))
	}
	d := desired{labels: map[string]string{TrustedLabel: "true"}, why: "status trusted"}
	for _, k := range slices.Sorted(maps.Keys(n.GetCertifiedTags())) {
		v := n.GetCertifiedTags()[k]
		key, err := tagLabel(k, v)
		if err != nil {
			d.skipped = append(d.skipped, err.Error())
			continue
		}
		d.labels[key] = v
	}
	return d
}

// tagLabel returns the label key for certified tag k=v, or why the tag
// makes no label. Tags are not rewritten to fit: a label the operator did
// not write (EU West → EU_West) could match a selector it was never meant
// for, while a missing label only keeps workloads off the node.
func tagLabel(k, v string) (string, error) {
	for _, r := range reserved {
		if strings.EqualFold(k, r) {
			return "", fmt.Errorf("tag %q is reserved: label %s is the labeler's own", k, Prefix+r)
		}
	}
	key := Prefix + k
	if errs := content.IsLabelKey(key); len(errs) > 0 {
		return "", fmt.Errorf("tag %q makes no valid label key %q: %s", k, key, strings.Join(errs, "; "))
	}
	if errs := content.IsLabelValue(v); len(errs) > 0 {
		return "", fmt.Errorf("tag %q: value %q is no valid label value: %s", k, v, strings.Join(errs, "; "))
	}
	return key, nil
}

func quoteOr(s, empty string) string {
	if s == "" {
		return empty
	}
	return fmt.Sprintf("%q", s)
}

// labelPatch returns the JSON merge patch that takes a node's owned labels
// from current to want, touching no other label, and whether anything
// changes. A null value removes a label.
func labelPatch(current, want map[string]string) (map[string]any, bool) {
	labels := map[string]any{}
	for k := range current {
		if _, keep := want[k]; owned(k) && !keep {
			labels[k] = nil
		}
	}
	for k, v := range want {
		if cur, ok := current[k]; !ok || cur != v {
			labels[k] = v
		}
	}
	if len(labels) == 0 {
		return nil, false
	}
	return map[string]any{"metadata": map[string]any{"labels": labels}}, true
}
