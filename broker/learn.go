package broker

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"gopkg.in/yaml.v3"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/policy"
)

// learnPCRs are the PCRs a drafted policy pins: firmware, its
// configuration, option ROMs, boot manager and Secure Boot state. PCRs that
// change at runtime (IMA's 10) or per boot are left out.
var learnPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// LearnPolicy implements apiv1.AdminServer.
func (a adminServer) LearnPolicy(ctx context.Context, req *apiv1.LearnPolicyRequest) (*apiv1.LearnPolicyResponse, error) {
	n, err := a.s.store.GetNode(ctx, req.GetNode())
	if err != nil {
		return nil, storeErr(fmt.Sprintf("node %q", req.GetNode()), err)
	}
	if len(n.LastPCRs) == 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "node %s has no accepted evidence yet; run 'attested node attest' on it first", n.Name)
	}
	name := req.GetName()
	if name == "" {
		name = "learned-" + n.Name
	}
	var facts evidence.Facts
	if len(n.LastFacts) > 0 {
		if err := json.Unmarshal(n.LastFacts, &facts); err != nil {
			return nil, status.Errorf(codes.Internal, "facts: %v", err)
		}
	}
	doc := yaml.Node{Kind: yaml.MappingNode}
	add := func(key string, v any, comment string) {
		var val yaml.Node
		if err := val.Encode(v); err != nil {
			return
		}
		k := yaml.Node{Kind: yaml.ScalarNode, Value: key, HeadComment: comment}
		doc.Content = append(doc.Content, &k, &val)
	}
	add("name", name, fmt.Sprintf("Drafted from node %s's evidence of %s.\nReview it before applying: it trusts exactly what that node booted.", n.Name, n.LastAttested.UTC().Format("2006-01-02 15:04:05 MST")))
	pcrs := map[int][]string{}
	for _, i := range learnPCRs {
		if d, ok := n.LastPCRs[i]; ok {
			pcrs[i] = []string{hex.EncodeToString(d)}
		}
	}
	add("pcrs", pcrs, "")
	if facts.SecureBoot != nil {
		add("secureBoot", map[bool]string{true: "required", false: "off"}[*facts.SecureBoot], "")
	}
	if len(facts.BootApps) > 0 {
		var apps []string
		for _, b := range facts.BootApps {
			apps = append(apps, hex.EncodeToString(b.Digest))
		}
		add("bootApplications", apps, "")
	}
	if len(n.Tags) > 0 {
		tags := map[string][]string{}
		for k, v := range n.Tags {
			tags[k] = []string{v}
		}
		add("tags", tags, "")
	}
	out, err := yaml.Marshal(&doc)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "draft: %v", err)
	}
	if _, err := policy.Parse(out); err != nil {
		return nil, status.Errorf(codes.Internal, "drafted policy does not parse: %v", err)
	}
	return &apiv1.LearnPolicyResponse{Yaml: string(out)}, nil
}
