package attest

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// The broker seals what it tells a node about itself to the node's
// session, like a layer key: only this TPM, in the state it attested, reads
// it.

// OpenExplanation opens Explain's answer.
func (s *Session) OpenExplanation(t *TPM, r *apiv1.ExplainResponse) (*apiv1.Explanation, error) {
	var out apiv1.Explanation
	if err := s.openMessage(t, binding.ExplainInfo(s.Node, s.PublicKey), r.GetSealed(), &out); err != nil {
		return nil, fmt.Errorf("attest: explanation: %w", err)
	}
	return &out, nil
}

// OpenTags opens NodeTags' answer.
func (s *Session) OpenTags(t *TPM, r *apiv1.NodeTagsResponse) (*apiv1.NodeTagSet, error) {
	var out apiv1.NodeTagSet
	if err := s.openMessage(t, binding.TagsInfo(s.Node, s.PublicKey), r.GetSealed(), &out); err != nil {
		return nil, fmt.Errorf("attest: tags: %w", err)
	}
	return &out, nil
}

func (s *Session) openMessage(t *TPM, info, sealed []byte, m proto.Message) error {
	data, err := s.open(t, info, sealed)
	if err != nil {
		return err
	}
	return proto.Unmarshal(data, m)
}
